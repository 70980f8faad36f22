from ssl_kvasir.models.backbone import Network, build_network, load_weights
from ssl_kvasir.models.ema import EMA

__all__ = ["EMA", "Network", "build_network", "load_weights"]
