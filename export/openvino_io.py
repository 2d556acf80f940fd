"""ONNX -> OpenVINO IR (.xml), with the constants of all graphs deduplicated into one shared `weights.bin`.

OpenVINO's `read_model(xml, bin)` takes the weights file separately, so several IR graphs can share one .bin
once the `offset` of each Const layer is rewritten to point into it.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import openvino as ov

ALIGN = 64


class SharedIRWeights:
    """Collects the Const blobs of several IR models into one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[str, int] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "wb")

    def add_model(self, onnx_path: Path, xml_path: Path, compress_to_fp16: bool = False) -> None:
        """Convert an ONNX graph to IR at xml_path, its constants going into the shared file."""
        model = ov.convert_model(str(onnx_path))
        own_bin = xml_path.with_suffix(".bin")
        ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
        blob = own_bin.read_bytes()
        tree = ET.parse(xml_path)
        for data in tree.getroot().iter("data"):
            if "offset" not in data.attrib or "size" not in data.attrib:
                continue
            off, size = int(data.attrib["offset"]), int(data.attrib["size"])
            raw = blob[off : off + size]
            key = hashlib.sha256(raw).hexdigest()
            if key not in self.index:
                pos = self.f.tell()
                pad = (-pos) % ALIGN
                if pad:
                    self.f.write(b"\0" * pad)
                    pos += pad
                self.f.write(raw)
                self.index[key] = pos
            data.set("offset", str(self.index[key]))
        tree.write(xml_path, encoding="utf-8", xml_declaration=True)
        own_bin.unlink()

    def close(self) -> None:
        self.f.close()
