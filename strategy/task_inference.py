"""Task-identity inference for SpaceNet: which learned task does an input belong to?

Class-incremental accuracy factors into *within-task* prediction times *task-identity*
prediction. SpaceNet's sub-networks predict almost perfectly within their task (each
is trained only on its own classes), but nothing in them was ever trained to tell the
tasks apart, so the argmax over all output units often picks the wrong task. This
module supplies the missing factor without keeping any record and without task ids.

``TaskInference`` keeps, for every class, a small generative model of its inputs: a
mixture of ``components`` probabilistic PCA models (Tipping & Bishop, 1999) with
``rank`` principal directions each, fitted at the end of the class's task from that
task's own records only, after mapping inputs to [0, 1] and raising them to ``power``
(a variance-stabilising transform). At inference it scores an input under every
learned class, turns the scores into a posterior over tasks, and predicts

    log p(class | x) = log p(task of class | x) + log softmax_{classes of that task}(logits)

so the task comes from the input statistics and the class within it from the task's
own sub-network. Bases are stored as 4-bit integers with one scale per direction and
means as 8-bit integers; the stored bytes are reported by ``nbytes`` (about 15.7 KB a
class with the defaults on 28x28 inputs).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.cat([torch.rand(200, 16, generator=g) * 0.3, 0.7 + torch.rand(200, 16, generator=g) * 0.3])
    >>> ti = TaskInference(components=1, rank=2)
    >>> ti.fit_task(0, x[:200], torch.zeros(200, dtype=torch.long))
    >>> ti.fit_task(1, x[200:], torch.ones(200, dtype=torch.long))
    >>> ti.predict_task(x[[0, 399]]).tolist()
    [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

STATE_VERSION = 1


@dataclass
class _Component:
    """One probabilistic PCA: mean, D x k basis W and isotropic noise variance.
    Covariance ``W W^T + noise * I``."""

    mean: Tensor  # [D]
    basis: Tensor  # [D, k]
    noise: float
    log_weight: float


def _ppca(
    z: Tensor, rank: int, noise_floor: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, float]:
    """Maximum-likelihood PPCA of the rows of ``z``: (mean, basis W, noise variance)."""
    n, d = z.shape
    mean = z.mean(dim=0)
    centred = z - mean
    total = float(centred.square().sum()) / n  # trace of the covariance
    k = min(rank, n - 1, d - 1)
    if k <= 0:
        return mean, z.new_zeros(d, 0), total / d + noise_floor
    # The k leading principal directions by randomized subspace iteration on the data
    # (Halko et al., 2011): exact enough here and far cheaper than a D x D eigenproblem.
    q = min(d, k + 10)
    basis = torch.linalg.qr(centred.T @ (centred @ torch.randn(d, q, generator=generator, dtype=z.dtype))).Q
    for _ in range(2):
        basis = torch.linalg.qr(centred.T @ (centred @ basis)).Q
    projected = centred @ basis
    evals, evecs = torch.linalg.eigh((projected.T @ projected / n).double())
    evals, evecs = evals.flip(0)[:k].clamp_min(0.0), (basis.double() @ evecs).flip(1)[:, :k]
    noise = max(total - float(evals.sum()), 0.0) / (d - k) + noise_floor
    w = evecs * (evals - noise).clamp_min(0.0).sqrt()
    return mean.double(), w, noise


class TaskInference:
    """Per-class mixtures of probabilistic PCA on the inputs, for choosing the task.

    Parameters (defaults chosen on split MNIST and Fashion-MNIST, selection seeds 10-14;
    see the README's measured results):
        components: mixture components per class (1: a single PPCA).
        rank: principal directions per component.
        power: inputs, mapped to [0, 1] by ``input_range``, are raised to this power.
        input_range: (lowest, highest) input value, e.g. (0, 255) for raw pixels or the
            normalised values of 0 and 1 for standardised images.
        noise_floor: added to each component's noise variance (regularisation).
        em_iterations: hard-EM rounds after the k-means initialisation of a mixture.
        bits: bits per stored basis coefficient (4 or 8); means are stored in 8 bits.
        temperature: divides the task log-likelihoods before the task posterior.
        class_weight: within the chosen task, the class comes from the task's output units'
            logits plus ``class_weight`` times the class log-likelihoods (a product of
            experts; 0: the network alone decides within the task).
        seed: seeds the k-means initialisation and the randomized eigensolver.
    """

    def __init__(
        self,
        components: int = 4,
        rank: int = 8,
        power: float = 0.5,
        input_range: tuple[float, float] = (0.0, 1.0),
        noise_floor: float = 1e-3,
        em_iterations: int = 2,
        bits: int = 4,
        temperature: float = 1.0,
        class_weight: float = 0.03,
        seed: int = 0,
    ) -> None:
        if components < 1 or rank < 0:
            raise ValueError("components must be >= 1 and rank >= 0")
        if bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        if not input_range[1] > input_range[0]:
            raise ValueError("input_range must be (low, high) with high > low")
        self.components = components
        self.rank = rank
        self.power = power
        self.input_range = input_range
        self.noise_floor = noise_floor
        self.em_iterations = em_iterations
        self.bits = bits
        self.temperature = temperature
        self.class_weight = class_weight
        self.seed = seed
        self.models_: dict[int, list[_Component]] = {}  # output unit -> its mixture
        self.task_of_unit_: dict[int, int] = {}
        self._scorer: _Scorer | None = None  # derived from models_, rebuilt when they change

    # ------------------------------------------------------------------ fitting
    def transform(self, inputs: Tensor) -> Tensor:
        """Flattened inputs mapped to [0, 1] and raised to ``power`` (float32)."""
        lo, hi = self.input_range
        z = ((inputs.detach().flatten(1).float().cpu() - lo) / (hi - lo)).clamp_(0.0, 1.0)
        return z.pow_(self.power) if self.power != 1.0 else z

    def fit_task(self, task: int, inputs: Tensor, units: Tensor) -> None:
        """Fit the mixtures of the classes (output ``units``) of ``task`` from its own
        inputs. Earlier tasks' models are neither read nor changed."""
        if inputs.shape[0] != units.shape[0]:
            raise ValueError("inputs and units differ in length")
        z = self.transform(inputs)
        units = units.cpu()
        generator = torch.Generator().manual_seed(self.seed * 7919 + task)
        for unit in sorted(set(units.tolist())):
            rows = z[units == unit]
            self.models_[int(unit)] = [self._store(c) for c in self._fit_mixture(rows, generator)]
            self.task_of_unit_[int(unit)] = int(task)
        self._scorer = None

    def _fit_mixture(self, z: Tensor, generator: torch.Generator) -> list[_Component]:
        m = max(1, min(self.components, z.shape[0] // max(2 * self.rank, 10)))
        assign = _kmeans(z, m, generator) if m > 1 else torch.zeros(z.shape[0], dtype=torch.long)
        comps: list[_Component] = []
        for it in range(self.em_iterations + 1):
            comps = []
            for j in range(m):
                rows = z[assign == j]
                if rows.shape[0] < 2:
                    continue
                mean, w, noise = _ppca(rows, self.rank, self.noise_floor, generator)
                comps.append(_Component(mean, w, noise, math.log(rows.shape[0] / z.shape[0])))
            if it == self.em_iterations or len(comps) == 1:
                break
            assign = _Scorer([[c] for c in comps])(z).argmax(dim=1)
        return comps

    def _store(self, comp: _Component) -> _Component:
        """Round the component to its stored precision, so that what is evaluated now
        is exactly what a checkpoint restores."""
        scale = _scale(comp.basis, self.bits).double()
        q = 2 ** (self.bits - 1) - 1
        basis = (comp.basis / scale).round().clamp(-q, q) * scale
        mean = (comp.mean * 255).round() / 255
        return _Component(mean, basis, _f32(comp.noise), _f32(comp.log_weight))

    # ---------------------------------------------------------------- inference
    @property
    def units_(self) -> list[int]:
        return sorted(self.models_)

    def class_log_likelihood(self, inputs: Tensor) -> Tensor:
        """[N, units] log-likelihood of each input under each modelled class (``units_``)."""
        z = self.transform(inputs)
        if not self.models_:
            return z.new_zeros(z.shape[0], 0)
        if self._scorer is None:
            self._scorer = _Scorer([self.models_[u] for u in self.units_])
        return self._scorer(z)

    def task_log_posterior(self, inputs: Tensor) -> tuple[list[int], Tensor]:
        """(tasks, [N, tasks] log p(task | x)) over the tasks that have statistics."""
        return self._task_log_posterior(self.class_log_likelihood(inputs))

    def _task_log_posterior(self, class_ll: Tensor) -> tuple[list[int], Tensor]:
        tasks = sorted(set(self.task_of_unit_.values()))
        columns = [self._columns_of(t) for t in tasks]
        per_task = torch.stack([torch.logsumexp(class_ll[:, c], dim=1) for c in columns], dim=1)
        return tasks, (per_task / self.temperature).log_softmax(dim=1)

    def _columns_of(self, task: int) -> list[int]:
        """Columns of ``class_log_likelihood`` (positions in ``units_``) of ``task``'s classes."""
        return [i for i, u in enumerate(self.units_) if self.task_of_unit_[u] == task]

    def predict_task(self, inputs: Tensor) -> Tensor:
        """The most likely task of each input (a task id)."""
        tasks, post = self.task_log_posterior(inputs)
        return torch.tensor(tasks, dtype=torch.long)[post.argmax(dim=1)]

    def apply(self, logits: Tensor, inputs: Tensor) -> Tensor:
        """Class log-probabilities: log p(task | x) plus the log-softmax, over the task's
        classes, of their logits (plus ``class_weight`` times their log-likelihoods).
        Units of tasks without statistics (or of no task) get ``-inf``."""
        if not self.models_:
            return logits
        class_ll = self.class_log_likelihood(inputs)
        tasks, post = self._task_log_posterior(class_ll)
        class_ll = class_ll.to(device=logits.device, dtype=logits.dtype)
        post = post.to(device=logits.device, dtype=logits.dtype)
        out = torch.full_like(logits, float("-inf"))
        for i, task in enumerate(tasks):
            cols = self._columns_of(task)
            units = torch.tensor([self.units_[c] for c in cols], device=logits.device)
            within = logits[:, units]
            if self.class_weight:
                within = within + self.class_weight * class_ll[:, cols]
            out[:, units] = within.log_softmax(dim=1) + post[:, i : i + 1]
        return out

    # -------------------------------------------------------------------- state
    @property
    def nbytes(self) -> int:
        """Bytes of the stored statistics (as in ``state_dict``)."""
        return sum(
            int(t.numel() * t.element_size()) for t in self.state_dict().values() if isinstance(t, Tensor)
        )

    def state_dict(self) -> dict[str, Tensor | int]:
        """Plain tensors: loadable with ``torch.load(weights_only=True)``."""
        q = 2 ** (self.bits - 1) - 1
        units, tasks, counts, means, scales, coeffs, noise, logw = [], [], [], [], [], [], [], []
        for u in self.units_:
            comps = self.models_[u]
            units.append(u)
            tasks.append(self.task_of_unit_[u])
            counts.append(len(comps))
            for c in comps:
                scale = _scale(c.basis, self.bits)
                means.append((c.mean * 255).round().to(torch.uint8))
                scales.append(scale)
                coeffs.append((c.basis / scale.double()).round().clamp(-q, q).to(torch.int8))
                noise.append(c.noise)
                logw.append(c.log_weight)
        d = means[0].numel() if means else 0
        k = max((c.shape[1] for c in coeffs), default=0)  # a small component may have fewer
        coeffs = [torch.nn.functional.pad(c, (0, k - c.shape[1])) for c in coeffs]
        scales = [torch.nn.functional.pad(v, (0, k - v.numel()), value=1.0) for v in scales]
        packed = torch.stack(coeffs) if coeffs else torch.zeros(0, d, k, dtype=torch.int8)
        return {
            "version": STATE_VERSION,
            "bits": self.bits,
            "units": torch.tensor(units, dtype=torch.int16),
            "tasks": torch.tensor(tasks, dtype=torch.int16),
            "components": torch.tensor(counts, dtype=torch.int16),
            "means": torch.stack(means) if means else torch.zeros(0, d, dtype=torch.uint8),
            "scales": torch.stack(scales) if scales else torch.zeros(0, k, dtype=torch.float16),
            "bases": _pack(packed, self.bits),
            "noise": torch.tensor(noise, dtype=torch.float32),
            "log_weights": torch.tensor(logw, dtype=torch.float32),
        }

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported task-inference state version {state.get('version')!r}")
        bits = int(state["bits"])
        means, scales, noise, logw = (state[k] for k in ("means", "scales", "noise", "log_weights"))
        assert isinstance(means, Tensor) and isinstance(scales, Tensor)
        assert isinstance(noise, Tensor) and isinstance(logw, Tensor)
        bases = _unpack(state["bases"], bits, means.shape[1], scales.shape[1])  # type: ignore[arg-type]
        self.models_, self.task_of_unit_ = {}, {}
        i = 0
        for u, t, n in zip(*(state[k].tolist() for k in ("units", "tasks", "components")), strict=True):  # type: ignore[union-attr]
            comps = []
            for j in range(i, i + n):
                comps.append(
                    _Component(
                        means[j].double() / 255,
                        bases[j].double() * scales[j].double(),
                        float(noise[j]),
                        float(logw[j]),
                    )
                )
            i += n
            self.models_[int(u)] = comps
            self.task_of_unit_[int(u)] = int(t)
        self._scorer = None


class _Scorer:
    """All components' log-likelihoods in a few batched float32 products.

    With r = z - mean: ||r||^2 = ||z||^2 - 2 z.mean + ||mean||^2, and the Woodbury form
    of the Mahalanobis term needs only W^T r, so one [N, D] x [D, sum k] product serves
    every component of every class."""

    def __init__(self, mixtures: list[list[_Component]]) -> None:
        comps = [c for mix in mixtures for c in mix]
        self.owner = torch.tensor([i for i, mix in enumerate(mixtures) for _ in mix])
        self.n_classes = len(mixtures)
        d = comps[0].mean.numel()
        k = max(c.basis.shape[1] for c in comps)
        self.means = torch.stack([c.mean for c in comps]).float()  # [C, D]
        bases = torch.zeros(len(comps), d, k, dtype=torch.float64)
        whiten = torch.zeros(len(comps), k, k, dtype=torch.float64)
        const = []
        for i, c in enumerate(comps):
            kc = c.basis.shape[1]
            bases[i, :, :kc] = c.basis
            inner = torch.eye(kc, dtype=torch.float64) + c.basis.T @ c.basis / c.noise
            chol = torch.linalg.cholesky(inner)
            whiten[i, :kc, :kc] = torch.linalg.inv(chol) / math.sqrt(c.noise)
            logdet = d * math.log(c.noise) + 2.0 * float(chol.diagonal().log().sum())
            const.append(-0.5 * (logdet + d * math.log(2 * math.pi)) + c.log_weight)
        self.bases = bases.permute(1, 0, 2).reshape(d, -1).float()  # [D, C*k]
        self.offset = torch.einsum("cd,cdk->ck", self.means.double(), bases).float()  # mean^T W
        self.whiten = whiten.float()  # ||whiten W^T r||^2 is the Woodbury correction
        self.noise = torch.tensor([c.noise for c in comps], dtype=torch.float32)
        self.mean_sq = self.means.square().sum(dim=1)
        self.const = torch.tensor(const, dtype=torch.float32)
        self.k = k

    def __call__(self, z: Tensor) -> Tensor:
        n = z.shape[0]
        r_sq = z.square().sum(dim=1, keepdim=True) - 2 * z @ self.means.T + self.mean_sq  # [N, C]
        proj = (z @ self.bases).view(n, -1, self.k) - self.offset  # [N, C, k]
        quad = torch.einsum("nck,cjk->ncj", proj, self.whiten).square().sum(dim=2)  # [N, C]
        per_comp = self.const - 0.5 * (r_sq - quad) / self.noise
        return _logsumexp_by(per_comp, self.owner, self.n_classes)


def _logsumexp_by(values: Tensor, owner: Tensor, n_groups: int) -> Tensor:
    """Log-sum-exp of the columns of ``values`` grouped by ``owner``."""
    index = owner.expand(values.shape[0], -1)
    top = torch.full((values.shape[0], n_groups), float("-inf")).scatter_reduce_(1, index, values, "amax")
    summed = torch.zeros_like(top).index_add_(1, owner, (values - top[:, owner]).exp())
    return top + summed.log()


def _scale(basis: Tensor, bits: int) -> Tensor:
    """Per-direction quantisation step (float16), 1 for an all-zero direction."""
    amax = basis.abs().amax(dim=0).float()
    q = 2 ** (bits - 1) - 1
    return torch.where(amax > 0, (amax / q).clamp_min(1e-7), torch.ones_like(amax)).half()


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _pack(coeffs: Tensor, bits: int) -> Tensor:
    """int8 coefficients in [-7, 7] two to a byte when ``bits`` is 4."""
    if bits == 8:
        return coeffs
    flat = (coeffs.flatten() + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unpack(packed: Tensor, bits: int, d: int, k: int) -> Tensor:
    if bits == 8:
        return packed.to(torch.int8)
    low, high = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
    flat = torch.stack([low, high], dim=1).flatten() - 8
    n = flat.numel() // (d * k) if d * k else 0
    return flat[: n * d * k].view(n, d, k).to(torch.int8)


def _kmeans(
    z_all: Tensor, m: int, generator: torch.Generator, iterations: int = 10, sample: int = 2048
) -> Tensor:
    """Cluster assignments of the rows of ``z_all`` into ``m`` groups: k-means (k++ start) on
    a random sample of at most ``sample`` rows, then every row to its nearest centre."""
    kept = torch.randperm(z_all.shape[0], generator=generator)[:sample].sort().values
    z = z_all[kept]
    n = z.shape[0]

    def sq_dist(centres: Tensor, rows: Tensor) -> Tensor:
        rows_sq = rows.square().sum(dim=1, keepdim=True)
        return (rows_sq - 2 * rows @ centres.T + centres.square().sum(dim=1)).clamp_min_(0.0)

    centres = z[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, m):
        d2 = sq_dist(centres, z).amin(dim=1)
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centres = torch.cat([centres, z[pick]])
    assign = sq_dist(centres, z).argmin(dim=1)
    for _ in range(iterations):
        counts = torch.bincount(assign, minlength=m).unsqueeze(1).to(z.dtype)
        sums = torch.zeros(m, z.shape[1], dtype=z.dtype).index_add_(0, assign, z)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)  # empty: stays
        new = sq_dist(centres, z).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return sq_dist(centres, z_all).argmin(dim=1)
