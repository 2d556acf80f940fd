"""soundctm-rt: real-time text-to-sound with SoundCTM. The runtime in this package never imports torch."""

__version__ = "0.1.0"
