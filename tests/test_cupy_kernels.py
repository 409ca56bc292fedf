"""spikingjelly 0.0.0.0.14's CuPy kernels for SGLFormer's neuron, compiled here without a GPU.

On CUDA the reference stack's neurons run CUDA C that spikingjelly writes for the neuron's configuration
and CuPy compiles with NVRTC. NVRTC needs no GPU and no driver, so this compiles those exact sources
(forward and backward, float32 and float16) for the GPUs the project is measured on, with the options CuPy
passes: a CuPy, CUDA or spikingjelly release that breaks them fails here first. It does not run them:
their numbers are checked on a GPU (bench/gpu.sh); docs/neurons.md says what this proves.
"""
from unittest import mock

import pytest
import torch

from sglformer.neuron import STACK, create_lif

if not STACK.startswith('spikingjelly 0.'):
    pytest.skip(f'{STACK} has no CuPy neurons', allow_module_level=True)

from cupy._core.core import assemble_cupy_compiler_options  # noqa: E402  (needs no device)
from cupy_backends.cuda.libs import nvrtc  # noqa: E402
from spikingjelly import configure  # noqa: E402
from spikingjelly.activation_based.auto_cuda import neuron_kernel  # noqa: E402

ARCHITECTURES = ('compute_90', 'sm_90')  # PTX, and the H100/H200 binary CuPy builds by default


def kernels_for(v_threshold, dtype):
    """The forward and backward kernels spikingjelly builds for our neuron's training forward on ``dtype``
    (the launch itself is replaced: there is no GPU)."""
    lif = create_lif(v_threshold)
    lif.backend = 'cupy'
    built = {}

    def launch(x_seq, v, v_threshold, v_reset, decay, forward_kernel, backward_kernel):
        built.update(forward=forward_kernel, backward=backward_kernel)
        return torch.zeros_like(x_seq), torch.zeros_like(x_seq)

    with mock.patch.object(neuron_kernel.LIFNodeATGF, 'apply', launch):
        lif(torch.zeros(4, 3, dtype=dtype))
    return built['forward'], built['backward']


def compile_with_nvrtc(source, name, architecture):
    """``source`` compiled as CuPy's RawKernel compiles it (its include paths and options, then those its NVRTC
    path adds); returns the PTX or the binary."""
    options = assemble_cupy_compiler_options(tuple(configure.cuda_compiler_options)) + (
        '-ftz=true', f'-arch={architecture}', '--device-as-default-execution-space')
    program = nvrtc.createProgram(source, f'{name}.cu', (), ())
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            pytest.fail(f'{name} does not compile: {exc}\n{nvrtc.getProgramLog(program)}')
        return nvrtc.getPTX(program) if architecture.startswith('compute') else nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


@pytest.mark.parametrize('dtype, cuda_type', [(torch.float32, 'float'), (torch.float16, 'half2')])
def test_the_neurons_cupy_kernels_compile(dtype, cuda_type):
    assert configure.cuda_compiler_backend == 'nvrtc'
    sources = {}
    for v_threshold in (1.0, 0.5):  # the threshold is an argument at launch: both give the same sources
        for kernel in kernels_for(v_threshold, dtype):
            assert kernel.dtype == cuda_type and '-use_fast_math' in configure.cuda_compiler_options
            sources[kernel.kernel_name] = kernel.full_codes
    assert sorted(sources) == [f'LIFNodeBPTTKernel_{cuda_type}_hard_reset_detach_reset',
                               f'LIFNodeFPTTKernel_{cuda_type}_hard_reset']
    for name, source in sources.items():
        for architecture in ARCHITECTURES:
            built = compile_with_nvrtc(source, name, architecture)
            if architecture.startswith('compute'):
                assert f'.entry {name}('.encode() in built
            else:
                assert built.startswith(b'\x7fELF') and name.encode() in built
