import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype_vae = torch.float32


class NansException(Exception):
    pass


def test_for_nans(x, where):
    # v1.10.1 checks a single element (index 0 in every dimension)
    if torch.isnan(x[(0,) * x.ndim]):
        raise NansException(f"A tensor with NaNs was produced in {where}.")
