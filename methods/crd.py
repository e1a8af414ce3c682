"""Contrastive representation distillation, memory banks and all (Tian et al. 2020), as the CRD benchmark runs it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.files import warn
from kdbench.losses import kd_loss
from kdbench.method import Batch, Method, Outputs, Probe, Taps, check_temperature, check_weights

#: RepDistiller's eps in ``ContrastLoss`` (crd/criterion.py).
EPS = 1e-7
_MASK64 = (1 << 64) - 1
#: Where the negatives come from: RepDistiller's loader (mode 'exact') or ContrastMemory's own uniform draw.
NEGATIVES = ("other_classes", "uniform")


def l2_normalise(x: Tensor) -> Tensor:
    """RepDistiller's ``Normalize(2)``: each row divided by its L2 norm (no eps, as there)."""
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def nce_contrast_loss(p: Tensor, n_data: int) -> Tensor:
    """RepDistiller's ``ContrastLoss`` (crd/criterion.py; the paper's eq. 18 with its NCE noise model).

    ``p`` is B × (K + 1): column 0 the positive's normalised score exp(s/τ)/Z, columns 1..K the
    negatives'. With the uniform noise distribution P_n = 1/N and c = K·P_n, the loss is
    −(1/B) Σ_b [log(p_b0 / (p_b0 + c + eps)) + Σ_j log(c / (p_bj + c + eps))].
    """
    k = p.shape[1] - 1
    c = k / float(n_data)
    pos, neg = p[:, 0], p[:, 1:]
    log_d1 = torch.log(pos / (pos + (c + EPS)))
    log_d0 = torch.log(torch.full_like(neg, c) / (neg + (c + EPS)))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): the negatives' generator seed for one draw."""
    h = 0
    for v in values:
        h = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def sample_positions(m: Tensor, k: int, generator: torch.Generator, *, width: int, short: bool, enough: bool,
                     batched: bool) -> Tensor:
    """B × ``k`` positions for the rows b of ``m``, each in 0 .. m_b − 1: a uniform ``k``-subset (without
    replacement) where m_b ≥ ``k``, else ``k`` uniform draws with replacement (RepDistiller's ``replace = k > len``).

    ``short`` and ``enough`` say whether some row may have m_b < ``k`` and some m_b ≥ ``k``; ``width`` ≥ every
    m_b. Both are known without reading ``m`` (no host sync on a GPU). ``batched`` chooses how the subsets are
    drawn: one B × ``width`` tensor of uniform keys, those at ≥ m_b set to +inf, and the ``k`` smallest
    (``topk``; one kernel on a GPU), or else one ``randperm(m_b)`` per row, cut to ``k`` (about 3x faster on the
    CPU). Each consumes ``generator`` in a fixed order: the same generator state gives the same positions.
    """
    rows, device = m.shape[0], m.device
    col = m.unsqueeze(1)
    out = None
    if short:  # (the modulo's bias, at most m_b / 2^62, is nil)
        out = torch.randint(0, 2**62, (rows, k), generator=generator, device=device) % col
    if not enough:
        return out
    if not batched:
        out = out if out is not None else torch.empty((rows, k), dtype=torch.long, device=device)
        for b, mb in enumerate(m.tolist()):
            if mb >= k:
                out[b] = torch.randperm(mb, generator=generator, device=device)[:k]
        return out
    keys = torch.rand((rows, width), generator=generator, device=device)
    keys.masked_fill_(torch.arange(width, device=device) >= col, math.inf)
    distinct = keys.topk(k, dim=1, largest=False, sorted=True).indices
    return distinct if out is None else torch.where(col >= k, distinct, out)


def _pooled_dim(probe: Probe, role: str) -> int:
    if probe.pooled is None:
        raise ValueError(f"crd needs the {role}'s pooled pre-logit vector, and {probe.model} has none")
    return math.prod(probe.pooled)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class _Classes:
    """The training images grouped by class, for drawing each sample's negatives from the other classes.

    ``order`` lists the training positions class by class (stably); image i's class fills ``order``'s
    positions ``start[i]`` .. ``start[i] + count[i] − 1``, so its candidates are the N − count[i] others.
    """

    def __init__(self, order: Tensor, start: Tensor, count: Tensor, *, short: bool, enough: bool, width: int) -> None:
        self.order, self.start, self.count = order, start, count
        self.short, self.enough, self.width = short, enough, width

    @classmethod
    def of(cls, labels: Tensor, train_size: int, k: int) -> _Classes:
        if not isinstance(labels, Tensor) or labels.shape != (train_size,) or labels.is_floating_point() \
                or labels.is_complex() or labels.dtype == torch.bool:
            raise KdbenchError(f"crd: the training labels must be {train_size} integer class labels (one per "
                               f"training image), got {getattr(labels, 'dtype', type(labels).__name__)} of shape "
                               f"{tuple(getattr(labels, 'shape', ()))}")
        _, cls_of, counts = torch.unique(labels.detach().long().cpu(), return_inverse=True, return_counts=True)
        if counts.numel() < 2:
            raise KdbenchError("crd: negatives='other_classes' draws each sample's negatives from the images of the "
                               "other classes, and every training image has the same label; use --set "
                               "crd.negatives=uniform (any other image) or a training set with several classes")
        candidates = train_size - counts  # per class
        order = torch.argsort(cls_of, stable=True)
        start = (torch.cumsum(counts, 0) - counts)[cls_of]
        return cls(order, start, counts[cls_of], short=bool((candidates < k).any()),
                   enough=bool((candidates >= k).any()), width=int(candidates.max()))

    def to(self, device: torch.device) -> _Classes:
        if self.order.device != device:
            self.order, self.start, self.count = (t.to(device) for t in (self.order, self.start, self.count))
        return self

    def draw(self, index: Tensor, k: int, gen: torch.Generator) -> Tensor:
        self.to(gen.device)
        i = index.to(gen.device)
        start, count = self.start[i].unsqueeze(1), self.count[i].unsqueeze(1)
        j = sample_positions(self.order.numel() - count.squeeze(1), k, gen, width=self.width, short=self.short,
                             enough=self.enough, batched=gen.device.type != "cpu")
        pos = torch.where(j >= start, j + count, j)  # past the sample's own class's block
        return self.order.index_select(0, pos.flatten()).view_as(pos).to(index.device)


class CRD(Method):
    """Contrastive representation distillation: NCE against memory banks of every training image's embeddings.

    Defaults are the CRD benchmark's (Tian et al. 2020, RepDistiller): ``scripts/run_cifar_distill.sh``
    runs CRD as ``--distill crd -a 0 -b 0.8`` (CE weight ``-r`` 1 by default, KD weight 0, CRD weight
    0.8), and ``train_student.py``'s defaults give the rest: ``--kd_T 4``, ``--feat_dim 128``,
    ``--nce_k 16384``, ``--nce_t 0.07``, ``--nce_m 0.5``.

    As in RepDistiller's ``crd/criterion.py`` (``CRDLoss``, ``Embed``) and ``crd/memory.py``
    (``ContrastMemory``): the student's and the teacher's pooled vectors (``feat[-1]``) each go through
    a trainable ``Embed`` (a ``nn.Linear`` to ``feat_dim``, then L2 normalisation); the teacher's
    vector is data (detached), its embedding trains with the student. Two memory banks hold one
    ``feat_dim`` row per training image, the student view's and the teacher view's, initialised
    uniform in [−1/√(feat_dim/3), 1/√(feat_dim/3)]. For each sample the positive is its own row
    (``batch.index``) and ``nce_k`` rows are negatives. Scores are exp(⟨bank row, embedding⟩/nce_t)
    divided by a constant Z per direction, fixed at the first batch to mean(score) · N (N the
    training-set size). The loss is ``ContrastLoss`` (:func:`nce_contrast_loss`) for the student
    anchor against the teacher bank plus the teacher anchor against the student bank, times
    ``crd_weight``; ``kd_weight`` > 0 adds Hinton's KD at ``temperature``. After the scores, the
    positives' rows of both banks move to momentum · row + (1 − momentum) · embedding and are
    L2-normalised (no gradient).

    Negatives (:meth:`draw_negatives`): with ``negatives="other_classes"``, the default, as the benchmark
    draws them: ``train_student.py`` loads CRD's data with ``get_cifar100_dataloaders_sample(k=nce_k,
    mode='exact')``, whose ``CIFAR100InstanceSample`` (``dataset/cifar100.py``) gives each sample its own
    index as the positive and ``nce_k`` negatives from the images of the other classes, without
    replacement when there are at least ``nce_k`` of them, with replacement otherwise. Those classes are
    the training labels :meth:`setup_data` is given; without them (an unlabelled transfer set) the draw
    falls back to ``"uniform"``, with a warning. ``negatives="uniform"`` draws uniformly with replacement
    from the N − 1 other training images (never the sample itself): ``ContrastMemory``'s own draw (its
    ``AliasMethod`` over equal weights) without the sample's index. The noise distribution in the loss
    stays the uniform 1/N either way, as in RepDistiller. The draw is made by a generator of the
    method's own that each draw reseeds from (a seed drawn from torch's global RNG in
    :meth:`setup_data`, the number of draws so far, the DDP rank). Both numbers are saved with the
    method's ``state_dict``, so a resumed run draws what the uninterrupted one did; the labels are not
    saved (:meth:`setup_data` is given them again on resume).

    The banks and Z are buffers: they move with the method, are saved in its checkpoints, and are
    counted in :meth:`state_bytes` (2 · N · feat_dim · 4 bytes). Limitation under DDP: DDP
    broadcasts rank 0's buffers to every rank before each forward, so each rank's bank updates of
    its own slice of the batch are overwritten and only rank 0's slice's updates persist (and Z is
    rank 0's slice's).
    """

    name = "crd"
    paper = "Tian, Krishnan, Isola: Contrastive Representation Distillation, ICLR 2020"

    def __init__(self, *, ce_weight: float = 1.0, crd_weight: float = 0.8, kd_weight: float = 0.0,
                 temperature: float = 4.0, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, negatives: str = "other_classes") -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(crd_weight=crd_weight, kd_weight=kd_weight)
        check_temperature(temperature)
        _positive_int("feat_dim", feat_dim)
        _positive_int("nce_k", nce_k)
        if not nce_t > 0:
            raise ValueError(f"nce_t (the contrast temperature) must be > 0, got {nce_t}")
        if not 0 <= nce_m < 1:
            raise ValueError(f"nce_m (the memory banks' momentum) must be in [0, 1), got {nce_m}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(map(repr, NEGATIVES))} (the images of the other "
                             f"classes, as RepDistiller's loader draws them; or any other image), got {negatives!r}")
        self.crd_weight = crd_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.feat_dim = feat_dim
        self.nce_k = nce_k
        self.nce_t = nce_t
        self.nce_m = nce_m
        self.negatives = negatives
        # Built in setup() from the probed pooled sizes.
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None
        # Allocated in setup_data() once the training-set size is known.
        self.register_buffer("memory_s", None)  # the student view's bank (RepDistiller's memory_v1)
        self.register_buffer("memory_t", None)  # the teacher view's bank (memory_v2)
        self.register_buffer("z", None)  # Z of [student anchor, teacher anchor]; < 0 until the first batch
        self._seed: int | None = None
        self._draws = 0
        self._generator: torch.Generator | None = None
        # From setup_data()'s labels, for negatives="other_classes" (None: the uniform draw); not saved.
        self._classes: _Classes | None = None
        self._warned = False

    def taps(self) -> Taps:
        return Taps(pooled=True)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        self.embed_s = nn.Linear(_pooled_dim(student, "student"), self.feat_dim)
        self.embed_t = nn.Linear(_pooled_dim(teachers[0], "teacher"), self.feat_dim)

    def setup_data(self, *, train_size: int, labels: Tensor | None = None) -> None:
        """Allocate the two N × feat_dim banks (RepDistiller's initialisation) and Z, and seed the sampler.

        One seed is drawn from torch's global RNG: it initialises the banks (through a CPU
        generator, so they are the same on every device) and seeds the negatives' sampler. With
        ``negatives="other_classes"``, ``labels`` (the N training labels) decide which images are each
        sample's candidates; None (an unlabelled set) falls back to the uniform draw, with a warning.
        """
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 2:
            raise KdbenchError(f"crd needs at least 2 training images (its negatives are the other images), "
                               f"got train_size={train_size!r}")
        self._classes = None
        if self.negatives == "other_classes":
            if labels is None:
                if not self._warned:
                    warn("crd: negatives='other_classes' draws each sample's negatives from the images of the other "
                         "classes, and this training set has no labels (an unlabelled transfer set): drawing them "
                         "uniformly from all the other images instead, as negatives='uniform' does")
                    self._warned = True
            else:
                self._classes = _Classes.of(labels, train_size, self.nce_k)
        seed = int(torch.randint(0, 2**62, ()).item())
        init = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        device = self.embed_s.weight.device if self.embed_s is not None else torch.device("cpu")
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(train_size, self.feat_dim, generator=init).mul_(2 * stdv).add_(-stdv)
            self.register_buffer(name, bank.to(device))
        self.register_buffer("z", torch.full((2,), -1.0, device=device))
        self._seed, self._draws, self._generator = seed, 0, None

    # -- the negatives' sampler ----------------------------------------------------------------
    # Its state is two integers, the seed and the number of draws so far: each draw reseeds the
    # generator from (seed, draws, rank). They travel in the state_dict ('_extra_state', a tensor on the
    # banks' device), so a resumed run draws what the uninterrupted one did; every DDP rank holds the
    # same two numbers (the ranks' weights-in-sync check compares them), while its draws differ by rank.
    def _sampler(self) -> torch.Generator:
        """The negatives' generator on the banks' device, seeded for the next draw."""
        if self.memory_s is None or self._seed is None:
            raise KdbenchError("crd: call setup_data(train_size=...) before the first forward (it allocates the "
                               "memory banks)")
        device = self.memory_s.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        return self._generator.manual_seed(_mix(self._seed, self._draws, distributed.rank()))

    def get_extra_state(self) -> Tensor:
        """[seed, draws so far] of the negatives' sampler (empty before :meth:`setup_data`)."""
        if self.memory_s is None or self._seed is None:
            return torch.empty(0, dtype=torch.int64)
        return torch.tensor([self._seed, self._draws], dtype=torch.int64, device=self.memory_s.device)

    def set_extra_state(self, state: Tensor) -> None:
        if state.numel():
            self._seed, self._draws = (int(v) for v in state.tolist())

    @torch.compiler.disable  # a generator draw: kept out of torch.compile's graph
    def draw_negatives(self, index: Tensor) -> Tensor:
        """``nce_k`` negatives for each sample, B × nce_k training-set positions.

        ``"uniform"`` (or no labels): uniform with replacement over the N − 1 images other than the
        sample itself (drawn from 0..N−2, then shifted past it). ``"other_classes"``: from the M images
        of the other classes, a uniform subset where M ≥ nce_k, else uniform with replacement. They are
        drawn as positions 0..M−1 in the list of training images ordered by class with the sample's own
        class left out (:func:`sample_positions`), then shifted past that class's block and looked up.

        Tests may replace this method on an instance to inject fixed negatives.
        """
        gen = self._sampler()
        self._draws += 1
        if self._classes is not None:
            return self._classes.draw(index, self.nce_k, gen)
        n = self.memory_s.shape[0]
        r = torch.randint(0, n - 1, (index.shape[0], self.nce_k), generator=gen, device=gen.device)
        r = r.to(index.device)
        return r + (r >= index.unsqueeze(1)).long()

    # -- the state a step reads and writes: outside torch.compile's graph ------------------------
    # The banks' positive rows are updated in the forward, before the backward pass that needs their old
    # values: the loss is computed from snapshots (clones) of the banks, and both the reading and the writing
    # of the buffers happen eagerly. (Compiled with the buffers read and written inside the graph, the
    # backward was measured to see the updated rows: its gradients were wrong.)
    @torch.compiler.disable
    def _read_state(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """B × (1 + nce_k) positions (the positive first, then the negatives), and copies of both banks and Z."""
        idx = torch.cat([index.unsqueeze(1), self.draw_negatives(index)], dim=1)
        return idx, self.memory_s.clone(), self.memory_t.clone(), self.z.clone()

    @torch.compiler.disable
    @torch.no_grad()
    def _write_state(self, index: Tensor, f_s: Tensor, f_t: Tensor, z: Tensor) -> None:
        """Keep Z; move the positives' rows of each bank towards their embeddings by momentum, L2-normalised."""
        self.z.copy_(z)
        for bank, f in ((self.memory_s, f_s), (self.memory_t, f_t)):
            rows = bank.index_select(0, index).mul_(self.nce_m).add_(f * (1 - self.nce_m))
            bank.index_copy_(0, index, l2_normalise(rows))

    # -- the loss ------------------------------------------------------------------------------
    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        if self.embed_s is None or self.embed_t is None:
            raise KdbenchError("crd: call setup() before the first forward (it builds the embeddings)")
        if self.memory_s is None or self.memory_t is None or self.z is None:
            raise KdbenchError("crd: call setup_data(train_size=...) before the first forward (it allocates the "
                               "memory banks)")
        if batch.index is None:
            raise KdbenchError("crd needs each sample's position in the training set (batch.index) to look up "
                               "and update its memory banks; this batch has none")
        index = batch.index.long()
        f_s = l2_normalise(self.embed_s(student.pooled.flatten(1)))
        f_t = l2_normalise(self.embed_t(teachers[0].pooled.flatten(1).detach()))
        idx, mem_s, mem_t, z = self._read_state(index)
        n = mem_s.shape[0]
        # Every bank row's score, then the sampled ones' (the values RepDistiller's bmm over the
        # gathered rows): B × N scores instead of B × (K + 1) × feat_dim gathered rows, less memory whenever
        # N < (K + 1) · feat_dim (2.1 M images at the defaults).
        score_s = torch.exp(torch.gather(f_s @ mem_t.t(), 1, idx) / self.nce_t)  # student anchor, teacher bank
        score_t = torch.exp(torch.gather(f_t @ mem_s.t(), 1, idx) / self.nce_t)  # teacher anchor, student bank
        # Z is fixed at the first batch (while it is still < 0) to mean(score) · N, without a host sync.
        first = torch.stack([score_s.mean(), score_t.mean()]).detach() * n
        z = torch.where(z < 0, first, z)
        loss = nce_contrast_loss(score_s / z[0], n) + nce_contrast_loss(score_t / z[1], n)
        self._write_state(index, f_s.detach(), f_t.detach(), z)
        terms = {"crd": self.crd_weight * loss}
        if self.kd_weight > 0:
            terms["kd"] = self.kd_weight * kd_loss(student.logits, teachers[0].logits.detach(), self.temperature)
        return terms
