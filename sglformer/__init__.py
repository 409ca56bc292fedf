"""SGLFormer: Spiking Global-Local-Fusion Transformer, a faithful re-implementation."""
from .checkpoint import CheckpointError, load_checkpoint
from .models import SGLFormer, SGLFormerImageNet, count_parameters
from .neuron import (NEURON_BACKENDS, NEURON_IMPLEMENTATIONS, STACK, NeuronBackendError, NeuronChoice, choose_neuron,
                     create_lif, use_neuron_implementation)
from .variants import load_variants

__version__ = '0.2.0'

__all__ = ['CheckpointError', 'load_checkpoint', 'SGLFormer', 'SGLFormerImageNet', 'count_parameters',
           'NEURON_BACKENDS', 'NEURON_IMPLEMENTATIONS', 'STACK', 'NeuronBackendError', 'NeuronChoice', 'choose_neuron',
           'create_lif', 'use_neuron_implementation', 'load_variants']
