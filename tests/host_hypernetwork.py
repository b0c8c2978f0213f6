"""For tests only: how A1111 1.10.1 reads and applies a hypernetwork file, re-implemented from the documented rules
(docs/host-formats.md#hypernetworks and #extension-loading), independent of our own `networks/hypernetwork.py`.

- `check_pt`: `modules/safe.py`'s gate before any `.pt` is loaded: zip entry names, then a restricted unpickle
  that allows only a short list of globals and hands every storage back empty.
- `HostHypernetwork.load`: the defaults `Hypernetwork.load` fills in for missing keys, the module sequence
  `HypernetworkModule` builds (Linear, activation unless last and not `activate_output`, LayerNorm, Dropout
  where the dropout structure is above 0), and a strict `load_state_dict` of each `(k, v)` pair.
- `host_cross_attention`: `attention_CrossAttention_forward`: the context (the input itself in self-attention)
  goes through the k and v modules of its width, `x + mlp(x) * multiplier`, before `to_k` / `to_v`.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch._utils", name): getattr(torch._utils, name)
       for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")},
    **{("torch", name): getattr(torch, name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage",
                                                         "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage")},
    ("torch.nn.modules.container", "ParameterDict"): nn.ParameterDict,
    ("__builtin__", "set"): set,
}
_ACTIVATIONS = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh,
                "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish, "softplus": nn.Softplus,
                "softsign": nn.Softsign, "celu": nn.CELU, "selu": nn.SELU}


class _RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module: str, name: str):
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return _GLOBALS[(module, name)]


def check_pt(path: Path) -> None:
    """Raise where the host's safe loader would refuse `path`."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bad = [name for name in names if not ZIP_ENTRY.match(name)]
        assert not bad, f"the host refuses zip entries {bad}"
        pickled = [name for name in names if re.match(r"^([^/]+)/data\.pkl$", name)]
        assert len(pickled) == 1, names
        with archive.open(pickled[0]) as handle:
            _RestrictedUnpickler(handle).load()


def _dropouts(data: dict) -> list:
    structure = data.get("layer_structure", [1, 2, 1])
    if data.get("dropout_structure") is not None:
        return data["dropout_structure"]
    if not data.get("use_dropout", False):
        return [0] * len(structure)
    return [0] + [0.3] * (len(structure) - 3) + [0.3 if data.get("last_layer_dropout", False) else 0] + [0]


class HostModule(nn.Module):
    def __init__(self, dim: int, state: dict, data: dict) -> None:
        super().__init__()
        structure = data.get("layer_structure", [1, 2, 1])
        activation = data.get("activation_func")
        dropouts = _dropouts(data)
        assert structure[0] == 1 and structure[-1] == 1
        layers: list[nn.Module] = []
        for i in range(len(structure) - 1):
            layers.append(nn.Linear(int(dim * structure[i]), int(dim * structure[i + 1])))
            if not (activation in ("linear", None) or (i >= len(structure) - 2 and not data.get("activate_output", True))):
                layers.append(_ACTIVATIONS[activation]())
            if data.get("is_layer_norm", False):
                layers.append(nn.LayerNorm(int(dim * structure[i + 1])))
            if dropouts[i + 1] > 0:
                layers.append(nn.Dropout(p=dropouts[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.load_state_dict(dict(state))
        self.multiplier = 1.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


class HostHypernetwork:
    def __init__(self, data: dict) -> None:
        self.layers = {size: (HostModule(size, pair[0], data), HostModule(size, pair[1], data))
                       for size, pair in data.items() if isinstance(size, int)}
        self.name = data.get("name")

    @classmethod
    def load(cls, path: Path) -> "HostHypernetwork":
        check_pt(path)
        return cls(torch.load(str(path), map_location="cpu", weights_only=False))

    def set_multiplier(self, multiplier: float) -> None:
        for pair in self.layers.values():
            for module in pair:
                module.multiplier = multiplier


@torch.no_grad()
def host_cross_attention(attention: nn.Module, x: torch.Tensor, context: torch.Tensor | None,
                         hypernetwork: HostHypernetwork) -> torch.Tensor:
    """The host's CrossAttention forward on a diffusers `Attention`'s weights (to_q/k/v, to_out, heads)."""
    heads = attention.heads
    q = attention.to_q(x)
    context = x if context is None else context
    pair = hypernetwork.layers.get(context.shape[2])
    context_k, context_v = (pair[0](context), pair[1](context)) if pair else (context, context)
    k, v = attention.to_k(context_k), attention.to_v(context_v)

    def split(t: torch.Tensor) -> torch.Tensor:
        b, n, hd = t.shape
        return t.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, hd // heads)

    q, k, v = split(q), split(k), split(v)
    weights = (torch.einsum("bid,bjd->bij", q, k) * (q.shape[-1] ** -0.5)).softmax(dim=-1)
    out = torch.einsum("bij,bjd->bid", weights, v)
    b = x.shape[0]
    out = out.reshape(b, heads, out.shape[1], out.shape[2]).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
    for layer in attention.to_out:  # ldm's to_out: Linear, Dropout
        out = layer(out)
    return out
