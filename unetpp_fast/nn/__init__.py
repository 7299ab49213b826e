"""Networks on the fused operator: they never know which backend runs.

node_grid.py  the X[i,j] node grid shared by UNet++ and U-Net (fused convs, BN folding)
blocks.py     conv blocks and upsampling choices
unetpp.py     UNetPlusPlus: deep supervision, accurate / fast mode, pruning L1..L4
unet.py       the paper's baselines: U-Net and wide U-Net
"""

from unetpp_fast.nn.unet import UNet, wide_unet
from unetpp_fast.nn.unetpp import UNetPlusPlus

__all__ = ["UNet", "UNetPlusPlus", "wide_unet"]
