"""ssl_kvasir: semi-supervised learning on HyperKvasir endoscopy images."""

from ssl_kvasir.version import __version__

__all__ = ["__version__"]
