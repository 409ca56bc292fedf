"""The ImageNet-1K variants: 224x224 images, T=4, depth 8 (one local stage and six global blocks).

The paper's "SGLFormer-8-512*" and "8-768*" are ``sglformer_ima_*``; its "SGLFormer-8-384" and
"8-512" are ``sglformer_ima2_*``. The two differ only in where the tokenizer pools.
"""
from sglformer.models import SGLFormerImageNet, register_variant

__all__ = []

HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12}

for _arch in ('ima', 'ima2'):
    for _width, _heads in HEADS_BY_WIDTH.items():
        register_variant(globals(), f'sglformer_{_arch}_8_{_width}', SGLFormerImageNet, dict(
            arch=_arch, img_size_h=224, img_size_w=224, in_channels=3, num_classes=1000,
            embed_dims=_width, num_heads=_heads, mlp_ratios=4, depths=8, T=4),
            f'SGLFormer {_arch}, D={_width}, {_heads} heads, ImageNet-1K.')
