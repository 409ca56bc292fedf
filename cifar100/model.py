"""SGLFormer-4-384 for CIFAR-100: the paper's configuration (T=4, 32x32 images, 100 classes)."""
from sglformer.models import SGLFormer, register_variant

__all__ = []

register_variant(globals(), 'sglformer_cifar100', SGLFormer, dict(
    img_size_h=32, img_size_w=32, in_channels=3, num_classes=100, embed_dims=384, num_heads=16,
    mlp_ratios=4, depths=1, T=4, tokenizer_stride=1, frame_input=False), __doc__)
