"""Student ensembles: how a pair names one (``T:S*3``, ``T:A+B``), and the ensemble as it would be deployed, for
timing it: one module whose output is the mean of its members' class probabilities.

Members of one architecture run as one batched call: their weights are stacked (``torch.func.stack_module_state``)
and the architecture is mapped over them with ``torch.vmap``, so K copies of a small network cost one launch per
layer rather than K. Members of different architectures run one after another. Where vmap cannot run an
architecture (an operation without a batching rule), its members run one after another, and :attr:`how` says so.
Weights do not change the time, so the members may be freshly initialised. :func:`timed_deployments` times both
ways and keeps the faster: vmap's batched convolutions pay off on a GPU and can lose on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from .errors import KdbenchError

MAX_MEMBERS = 64


def parse_members(text: str, pair: str) -> tuple[str, ...]:
    """A student side ``S``, ``S*K`` or ``A+B[*K]...`` as its members' models, in order."""
    members: list[str] = []
    for item in text.split("+"):
        model, star, count = (x.strip() for x in item.partition("*"))
        if not model or (star and not (count.isascii() and count.isdigit() and int(count) >= 1)):
            raise KdbenchError(f"pair '{pair}': student '{item.strip()}' must be MODEL or MODEL*K with a whole K >= 1 "
                               "(a student ensemble: T:S*3 is three seeds of S, T:A+B two architectures)")
        members += [model] * (int(count) if star else 1)
    if len(members) > MAX_MEMBERS:
        raise KdbenchError(f"pair '{pair}': a student ensemble of {len(members)} members; at most {MAX_MEMBERS}")
    return tuple(members)


def ensemble_text(members: Sequence[str]) -> str:
    """Members as tables name the ensemble: runs of one model as 'm×K', joined by '+' ('a×2+b')."""
    parts: list[list[Any]] = []
    for m in members:
        if parts and parts[-1][0] == m:
            parts[-1][1] += 1
        else:
            parts.append([m, 1])
    return "+".join(m if k == 1 else f"{m}×{k}" for m, k in parts)


def ensemble_size(text: str) -> int:
    """How many members an :func:`ensemble_text` names ('a×2+b' -> 3)."""
    return sum(int(part.partition("×")[2] or 1) for part in text.split("+"))


class _Stacked(nn.Module):
    """K models of one architecture as one vmapped call; returns their logits, [K, batch, classes]."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        params, buffers = stack_module_state([m.eval() for m in models])
        self.param_names, self.buffer_names = list(params), list(buffers)
        # Held as this module's own tensors so that .to(device) moves them; never trained.
        self.weights = nn.ParameterList(nn.Parameter(p.detach(), requires_grad=False) for p in params.values())
        self.state = nn.ParameterList(nn.Parameter(b.detach(), requires_grad=False) for b in buffers.values())
        self.base = [copy.deepcopy(models[0]).to("meta")]  # a list: not a submodule, never moved

    def forward(self, x: Tensor) -> Tensor:
        def one(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            return functional_call(self.base[0], (params, buffers), (x,))

        params = dict(zip(self.param_names, self.weights))
        buffers = dict(zip(self.buffer_names, self.state))
        return torch.vmap(one, randomness="same")(params, buffers)


class DeployedEnsemble(nn.Module):
    """Members grouped by architecture (``groups``: name -> its members); forward gives the mean probabilities."""

    def __init__(self, groups: dict[str, list[nn.Module]], *, batched: bool = True,
                 sample: Tensor | None = None) -> None:
        super().__init__()
        self.parts = nn.ModuleList()
        how = []
        for name, models in groups.items():
            part = _batched(models, sample) if batched and len(models) > 1 else None
            if part is not None:
                self.parts.append(part)
                how.append(f"{len(models)} × {name} batched (torch.vmap)")
            else:
                self.parts.extend(m.eval() for m in models)
                how.append(name if len(models) == 1 else f"{len(models)} × {name} one after another"
                           + (" (vmap failed)" if batched else ""))
        self.members = sum(len(m) for m in groups.values())
        #: How the members run, for the row: '3 × a batched (torch.vmap), then b'.
        self.how = ", then ".join(how)

    def forward(self, x: Tensor) -> Tensor:
        total = None
        for part in self.parts:
            out = part(x)
            probs = out.float().softmax(-1)
            probs = probs.sum(0) if isinstance(part, _Stacked) else probs
            total = probs if total is None else total + probs
        assert total is not None
        return total / self.members


def _batched(models: Sequence[nn.Module], sample: Tensor | None) -> _Stacked | None:
    """The members as one vmapped module, or None when vmap cannot run their architecture."""
    try:
        stacked = _Stacked(models)
        if sample is not None:
            with torch.inference_mode():
                stacked(sample)
        return stacked
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None


def deployed(members: Sequence[str], create: Callable[[str], nn.Module], *, batched: bool = True,
             sample: Tensor | None = None) -> DeployedEnsemble:
    """The ensemble of ``members`` (model names, in order), each built by ``create(name)``."""
    groups: dict[str, list[nn.Module]] = {}
    for name in members:
        groups.setdefault(name, []).append(create(name))
    return DeployedEnsemble(groups, batched=batched, sample=sample)


def timed_deployments(members: Sequence[str], create: Callable[[str], nn.Module],
                      measure: Callable[[nn.Module], float], sample: Tensor) -> tuple[float, str]:
    """The ensemble's inference images/s as deployed, and how it ran. Both deployments are timed (``measure``: a
    module's images/s) when members share an architecture, and the faster is the ensemble's: batching same-shape
    members helps on a GPU and may not on a CPU. ``how`` gives both figures."""
    one_by_one = deployed(members, create, batched=False)
    times = {one_by_one.how or "one after another": measure(one_by_one)}
    if len(set(members)) < len(members):
        batched = deployed(members, create, batched=True, sample=sample)
        if batched.how not in times:
            times[batched.how] = measure(batched)
    best = max(times, key=times.__getitem__)
    return times[best], "; ".join(f"{how}: {tp:.0f} img/s" + (" (used)" if how == best and len(times) > 1 else "")
                                  for how, tp in times.items())
