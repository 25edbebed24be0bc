"""Stand-in for ``comfy.model_patcher.ModelPatcher`` (tests only): the model and its load/offload devices."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
