"""SGLFormer for CIFAR10-DVS as the authors released it: D=256, 16 heads, 128x128 event frames,
10 classes, T=10 (pass T=16 for the other row). That is 4.07M parameters, not the paper's "3-256"."""
from sglformer.models import SGLFormer, register_variant

__all__ = []

register_variant(globals(), 'sglformer_cifar10dvs', SGLFormer, dict(
    img_size_h=128, img_size_w=128, in_channels=2, num_classes=10, embed_dims=256, num_heads=16,
    mlp_ratios=4, depths=1, T=10, tokenizer_stride=2, frame_input=True), __doc__)
