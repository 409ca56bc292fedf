"""SGLFormer: Spiking Global-Local-Fusion Transformer, a faithful re-implementation."""
from .checkpoint import CheckpointError, load_checkpoint
from .models import SGLFormer, SGLFormerImageNet, count_parameters
from .neuron import NEURON_BACKENDS, NeuronBackendError, create_lif
from .variants import load_variants

__version__ = '0.1.0'

__all__ = ['CheckpointError', 'load_checkpoint', 'SGLFormer', 'SGLFormerImageNet', 'count_parameters',
           'NEURON_BACKENDS', 'NeuronBackendError', 'create_lif', 'load_variants']
