"""VGG19-style backbone at stride 8, as TAO's BodyPoseNet builds it.

Conv3x3 + BatchNorm + ReLU everywhere, no pooling: the first convolution of
blocks 2, 3 and 4 has stride 2 (where VGG19 pools), so the feature map is
1/8 of the input. Blocks 64x2, 128x2, 256x4, 512x3 where the third conv of
block 4 has 256 channels (OpenPose's conv4_3_CPM; TAO's "modified VGG").
The 3x3 128-channel "channel reduction" conv that feeds the stages is part
of the head (see heads.py): it uses the stages' bias setting and no BN,
which is what TAO's published parameter counts require.
"""

from __future__ import annotations

# (block, filters per conv); the first conv of every block after the first
# downsamples.
VGG19_BLOCKS = ((1, (64, 64)), (2, (128, 128)), (3, (256, 256, 256, 256)),
                (4, (512, 512, 256)))


def vgg19_backbone(x, convs, use_bias: bool):
    """Apply the stride-8 VGG19 backbone to tensor ``x``; returns the features."""
    for block, filters in VGG19_BLOCKS:
        for i, f in enumerate(filters):
            stride = 2 if (block > 1 and i == 0) else 1
            x = convs.conv(x, f, 3, f"block{block}_conv{i + 1}", stride=stride,
                           use_bias=use_bias, batch_norm=True, activation="relu")
    return x

