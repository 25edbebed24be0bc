"""Stand-in for ``comfy.model_management`` (tests only)."""
import torch


class InterruptProcessingException(Exception):
    pass


OOM_EXCEPTION = torch.cuda.OutOfMemoryError
interrupt_requested = False
freed: list = []


def get_torch_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def get_free_memory(device=None):
    return 8 * 2**30


#: what get_total_memory answers (ComfyUI: the device's total memory); tests set a small card
total_memory = 64 * 2**30


def get_total_memory(dev=None, torch_total_too=False):
    return total_memory


def module_size(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def extra_reserved_memory():
    return 0


def free_memory(memory_required, device, keep_loaded=()):
    freed.append(int(memory_required))


#: (patchers, memory_required, force_full_load) of every load_models_gpu call, for the tests
load_calls: list = []


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    load_calls.append((list(models), int(memory_required), bool(force_full_load)))
    for patcher in models:
        patcher.model.to(patcher.load_device)


def dtype_size(dtype):
    import torch

    return torch.empty((), dtype=dtype).element_size()


def should_use_bf16(device=None, **kw):
    return False


def throw_exception_if_processing_interrupted():
    global interrupt_requested
    if interrupt_requested:
        interrupt_requested = False
        raise InterruptProcessingException()
