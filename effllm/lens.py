"""The logit lens: what each layer would predict if the final norm and LM head were applied to it,
and fitted exits that make intermediate layers predictive.

Early exits only work where intermediate layers already predict the final token. The logit lens
(nostalgebraist 2020) measures how often they do with no training. :class:`LinearExits` are the
least-squares maps of Din et al. 2023 ("Jump to Conclusions"): per layer l an affine map A_l with
h_l A_l + b_l ~ h_L, fitted in closed form on calibration tokens. On a 2-core CPU the fit takes seconds,
no gradient steps and no LoRA, which is why effllm uses them as its default fitted exits.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from effllm import checks, io
from effllm.adapters import get_adapter
from effllm.decoding.exits import agreement_counts, exit_logits

EXITS_FILE = "linear_exits.safetensors"
EXITS_KIND = "effllm-linear-exits"


@torch.no_grad()
def logit_lens_agreement(
    model: torch.nn.Module,
    token_ids: torch.LongTensor,
    batch_size: int = 4,
    top_k: int = 5,
    progress: bool = True,
    exit_transform: LinearExits | None = None,
) -> pd.DataFrame:
    """Per layer, how often the logit lens agrees with the model's final prediction.

    ``token_ids`` is [n_sequences, seq_len]. Every position of every sequence counts once. Returns a tidy
    table with one row per layer (1-based; the last layer agrees with itself by definition): ``layer``,
    ``agreement`` (argmax at the layer == final argmax), ``final_in_top_k`` (the final argmax is among the
    layer's ``top_k``), ``tokens``. With ``exit_transform`` (fitted exits) each intermediate state is mapped
    by it before the final norm and head.
    """
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_layers = adapter.num_layers
    agree = torch.zeros(n_layers, dtype=torch.long)
    in_top_k = torch.zeros(n_layers, dtype=torch.long)
    total = 0
    batches = range(0, token_ids.shape[0], batch_size)
    for start in tqdm(batches, desc="logit lens", disable=not progress):
        batch = token_ids[start : start + batch_size].to(device)
        final_logits, states = adapter.forward(batch, output_hidden_states=True)
        final = final_logits.argmax(-1)  # [b, s]
        for layer in range(1, n_layers + 1):
            hits, in_top = agreement_counts(adapter, layer, states[layer], final, exit_transform, top_k)
            agree[layer - 1] += hits
            in_top_k[layer - 1] += in_top
        total += final.numel()
    return pd.DataFrame(
        {
            "layer": range(1, n_layers + 1),
            "agreement": (agree.double() / total).numpy(),
            f"final_in_top_{top_k}": (in_top_k.double() / total).numpy(),
            "tokens": total,
        }
    )


class LinearExits(torch.nn.Module):
    """Per-layer affine maps h_l -> h_L for layers 1..L-1: ``exits(layer, h)``; layer L passes through.

    The call signature is the ``exit_transform`` of :func:`effllm.exits.generate`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, meta: dict | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # [L-1, d, d], applied as h @ W
        self.bias = torch.nn.Parameter(bias, requires_grad=False)  # [L-1, d]
        self.meta = dict(meta or {})

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0] + 1

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer >= self.num_layers:
            return hidden
        # fitted in float32; a bfloat16 model's states are mapped in the maps' precision and handed back in theirs
        mapped = hidden.to(self.weight.dtype) @ self.weight[layer - 1] + self.bias[layer - 1]
        return mapped.to(hidden.dtype)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/linear_exits.safetensors`` and its checksummed sidecar (effllm.io), atomically."""
        folder = Path(folder)
        io.save_tensors(folder / EXITS_FILE, {"weight": self.weight.data, "bias": self.bias.data}, self.meta,
                        EXITS_KIND)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: torch.nn.Module | None = None) -> LinearExits:
        """Load exits saved by :meth:`save` after checking them against their checksum
        (:class:`effllm.io.ArtifactError` when changed, cut short or saved by an older effllm); with ``model``,
        check they were fitted for its shape."""
        folder = Path(folder)
        tensors, meta = io.load_tensors(folder / EXITS_FILE, EXITS_KIND)
        if set(tensors) != {"weight", "bias"}:
            raise io.ArtifactError(f"{folder / EXITS_FILE} holds {sorted(tensors)}, not the weight and bias of exits")
        exits = cls(tensors["weight"], tensors["bias"], meta)
        if model is not None:
            adapter = get_adapter(model)
            if (exits.num_layers, exits.weight.shape[-1]) != (adapter.num_layers, adapter.hidden_size):
                raise ValueError(
                    f"exits in {folder} were fitted for {exits.num_layers} layers of width {exits.weight.shape[-1]} "
                    f"({meta.get('model', '?')}); this model has {adapter.num_layers} layers of width "
                    f"{adapter.hidden_size}"
                )
        return exits


@torch.no_grad()
def fit_linear_exits(
    model: torch.nn.Module, token_ids: torch.LongTensor, batch_size: int = 4, ridge: float = 1e-3,
    progress: bool = True, meta: dict | None = None,
) -> LinearExits:
    """Least-squares affine maps from each layer's state to the last layer's, over every position of
    ``token_ids`` [n, seq]. Normal equations in float64 with a ridge of ``ridge`` times the mean diagonal.
    """
    adapter = get_adapter(model)
    n_layers, d = adapter.num_layers, adapter.hidden_size
    device = next(model.parameters()).device
    gram = torch.zeros(n_layers - 1, d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(n_layers - 1, d + 1, d, dtype=torch.float64)
    for start in tqdm(range(0, token_ids.shape[0], batch_size), desc="fit exits", disable=not progress):
        _, states = adapter.forward(token_ids[start : start + batch_size].to(device), output_hidden_states=True)
        target = states[-1].reshape(-1, d).float().cpu()
        for layer in range(1, n_layers):
            x = states[layer].reshape(-1, d).float().cpu()
            x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
            # float32 products per batch (a few thousand tokens), float64 sums across batches
            gram[layer - 1] += (x.T @ x).double()
            cross[layer - 1] += (x.T @ target).double()
    eye = torch.eye(d + 1, dtype=torch.float64)
    solutions = torch.stack([
        torch.linalg.solve(g + ridge * g.diagonal().mean() * eye, c) for g, c in zip(gram, cross, strict=True)
    ])  # [L-1, d+1, d]
    dtype = next(model.parameters()).dtype
    meta = {"method": "least-squares (Din et al. 2023)", "tokens": int(token_ids.numel()), "ridge": ridge,
            **(meta or {})}
    return LinearExits(solutions[:, :d].to(dtype), solutions[:, d].to(dtype), meta).to(device)


def cached_linear_exits(
    model: torch.nn.Module,
    tokenizer,
    model_name: str,
    corpora: tuple[str, ...] = ("python-docs", "python-code"),
    n_per_corpus: int = 16,
    seq_len: int = 256,
    seed: int = 0,
    refit: bool = False,
) -> LinearExits:
    """Linear exits for ``model_name``, fitted once on the built-in ``corpora`` (train splits) and saved
    beside the model cache (``cache_dir()/exits/<model_name>/<settings>``) so notebooks reuse them."""
    from safetensors import SafetensorError

    from effllm import data
    from effllm.paths import cache_dir

    settings = f"{'+'.join(corpora)}-{n_per_corpus}x{seq_len}-seed{seed}"
    folder = cache_dir() / "exits" / model_name.replace("/", "--") / settings
    if not refit:
        try:
            return LinearExits.load(folder, model=model).to(next(model.parameters()).device)
        except (OSError, ValueError, SafetensorError):  # missing, corrupt, old format or another shape: fit again
            pass
    (folder / "linear_exits.json").unlink(missing_ok=True)  # the metadata file of older effllm versions
    ids = torch.cat([data.calibration(c, tokenizer, n_per_corpus, seq_len, seed=seed) for c in corpora])
    exits = fit_linear_exits(model, ids, meta={"model": model_name, "corpora": list(corpora), "seed": seed})
    exits.save(folder)
    return exits


META_HEADS = ("mlp", "logistic")


class MetaClassifier(torch.nn.Module):
    """CALM's ``meta`` confidence: the probability that the exit at layer l already gives the final token, from the
    exit's normed state (after the fitted exit map, if any), trained on labels 1[argmax at l == argmax at L].

    ``head="mlp"`` (the default) is the authors' (fast_robust_early_exit ``models/deploying_t5.py:1035-1039``):
    Linear(d, d) - ReLU - Linear(d, 2), one for every layer, confidence = softmax[1] (``util/skip_conf.py:19-29``),
    trained with class-balanced, logit-adjusted cross-entropy (``util/losses.py:133-159``). ``head="logistic"`` is
    effllm's earlier variant: a logistic regression plus a learned per-layer offset, trained with plain BCE. Called as
    ``classifier(layer, hidden) -> probability`` (the ``meta_classifier`` of :func:`effllm.exits.generate`).
    """

    def __init__(self, hidden_size: int, n_layers: int, exit_transform: LinearExits | None = None,
                 head: str = "mlp"):
        super().__init__()
        self.head = checks.choice("head", head, META_HEADS)
        if head == "mlp":
            self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden_size, 2))
        else:
            self.linear = torch.nn.Linear(hidden_size, 1)
            self.layer_bias = torch.nn.Parameter(torch.zeros(n_layers + 1))
        self.exit_transform = exit_transform
        self.n_layers = n_layers

    @property
    def dtype(self) -> torch.dtype:
        return (self.net[0] if self.head == "mlp" else self.linear).weight.dtype

    def class_logits(self, features: torch.Tensor, layers: torch.LongTensor) -> torch.Tensor:
        """[..., 2] logits of (disagree, agree); the logistic head's are (0, its logit)."""
        # trained in float32; a bfloat16 model's features are scored in the classifier's precision
        features = features.to(self.dtype)
        if self.head == "mlp":
            return self.net(features)
        logit = self.linear(features).squeeze(-1) + self.layer_bias[layers]
        return torch.stack([torch.zeros_like(logit), logit], dim=-1)

    def logit(self, features: torch.Tensor, layers: torch.LongTensor) -> torch.Tensor:
        """log-odds of "agree": sigmoid of it is softmax(class_logits)[..., 1]."""
        z = self.class_logits(features, layers)
        return z[..., 1] - z[..., 0]

    def features(self, adapter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.exit_transform is not None and layer < self.n_layers:
            hidden = self.exit_transform(layer, hidden)
        return adapter.normed(hidden)

    def bind(self, model: torch.nn.Module):
        """The ``meta_classifier(layer, hidden)`` callable for ``model``."""
        adapter = get_adapter(model)

        def classify(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = self.features(adapter, layer, hidden)
                return torch.softmax(self.class_logits(features, torch.tensor(layer)).float(), dim=-1)[..., 1]

        return classify


def _meta_loss(classifier: MetaClassifier, x: torch.Tensor, y: torch.Tensor, layers: torch.LongTensor,
               adjustment: torch.Tensor) -> torch.Tensor:
    if classifier.head == "mlp":  # losses.py:154-158: CE(z + log[neg, pos], y), the logit adjustment
        return torch.nn.functional.cross_entropy(classifier.class_logits(x, layers) + adjustment, y.long())
    return torch.nn.functional.binary_cross_entropy_with_logits(classifier.logit(x, layers), y)


def fit_meta_classifier(
    model: torch.nn.Module,
    token_ids: torch.LongTensor,
    exit_transform: LinearExits | None = None,
    min_layer: int = 1,
    steps: int = 300,
    lr: float | None = None,
    batch_size: int = 4,
    progress: bool = True,
    head: str = "mlp",
) -> MetaClassifier:
    """Train a :class:`MetaClassifier` on every position of ``token_ids`` [n, seq] and layers
    ``min_layer`` .. L-1 (full-batch Adam on the collected features, ``lr`` 1e-3 for the MLP and 0.05 for the
    logistic head unless given; the backbone is frozen). ``train_loss`` is the loss it was trained with,
    ``balanced_accuracy`` the mean of its recall on either class on the training positions."""
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    torch.manual_seed(0)  # the MLP's initial weights
    classifier = MetaClassifier(adapter.hidden_size, n_layers, exit_transform, head=head)
    lr = lr if lr is not None else (1e-3 if head == "mlp" else 0.05)
    features, layers, labels = [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, token_ids.shape[0], batch_size), desc="meta features", disable=not progress):
            final_logits, states = adapter.forward(token_ids[start : start + batch_size], output_hidden_states=True)
            final = final_logits.argmax(-1).reshape(-1)
            for layer in range(min_layer, n_layers):
                x = classifier.features(adapter, layer, states[layer]).reshape(-1, adapter.hidden_size)
                features.append(x.float())
                predicted = exit_logits(adapter, layer, states[layer], exit_transform).argmax(-1).reshape(-1)
                labels.append(predicted == final)
                layers.append(torch.full((x.shape[0],), layer))
    x, y, layer_ids = torch.cat(features), torch.cat(labels).float(), torch.cat(layers)
    optimizer = torch.optim.Adam([p for n, p in classifier.named_parameters() if not n.startswith("exit_transform")],
                                 lr=lr)
    positive = float(y.mean())
    adjustment = torch.log(torch.tensor([1 - positive, positive]).clamp_min(1e-12))  # the class prior
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _meta_loss(classifier, x, y, layer_ids, adjustment)
        loss.backward()
        optimizer.step()
    classifier.train_loss = float(loss.detach())
    classifier.positive_rate = positive
    with torch.no_grad():
        said = classifier.logit(x, layer_ids) > 0
    recalls = [float((said[y == c] == bool(c)).float().mean()) for c in (0, 1) if bool((y == c).any())]
    classifier.balanced_accuracy = sum(recalls) / len(recalls)
    return classifier.requires_grad_(False)
