"""ROME's hyperparameters (:class:`ROMEHparams`), the per-model defaults and the reading of
EasyEdit's YAML files. :mod:`steamviz.edit.rome` re-exports these names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


from .hparams import VStarHparams


@dataclass
class ROMEHparams(VStarHparams):
    """ROME hyperparameters (names follow the ROME/EasyEdit YAML files): the shared v*
    optimisation (:class:`~steamviz.edit.hparams.VStarHparams`), the edited block and the
    key statistics."""

    RENAMED = {"layer": "block"}

    block: int = 5  # the edited block: its MLP output projection gets the rank-one update
    kl_prompts: tuple = ("{} is a",)
    # where the KL ("essence") distribution is read in the KL prompts: "subject_last" (ROME's
    # and EasyEdit's choice: the subject's last token) or "last" (the prompt's last token)
    kl_position: str = "subject_last"
    mom2_adjustment: bool = False  # False: C = I (EasyEdit's shipped configs)
    mom2_corpus: str | None = None  # folder of .txt files, or "model"
    mom2_n_tokens: int = 100_000
    mom2_ridge: float = 0.0
    # dtype of the matrix products above the edited block during the v* optimisation
    # (None: the model's). "bfloat16" is faster on CPUs with AMX-BF16, at a small cost in
    # precision (measured: docs/results.md#rome).
    v_matmul_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kl_prompts = tuple(self.kl_prompts)
        if self.kl_position not in ("subject_last", "last"):
            raise ValueError(f"kl_position must be 'subject_last' (ROME) or 'last', got "
                             f"{self.kl_position!r}")
        if self.v_matmul_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"v_matmul_dtype must be null, 'float32', 'bfloat16' or 'float16', "
                             f"got {self.v_matmul_dtype!r}")

    @classmethod
    def for_model(cls, lm_or_name: Any) -> "ROMEHparams":
        """Per-model defaults (edited block by depth, EasyEdit's LLaMA settings otherwise)."""
        name = cls.model_name(lm_or_name)
        n = getattr(lm_or_name, "n_blocks", None)
        if name in MODEL_DEFAULTS:
            return cls(**MODEL_DEFAULTS[name])
        hp = cls()
        if n is not None:
            hp.block = max(1, round(n * 0.17))  # early-middle MLP, as ROME's causal traces
        return hp

    @classmethod
    def from_dict(cls, d: dict, source: str = "hparams") -> "ROMEHparams":
        """From an EasyEdit / ROME hparams mapping (``layers: [5]``, ``v_lr``...; read
        from a YAML file by ``from_yaml``) or steamviz's own (``block: 5``; ``layer: 5`` as
        written before the rename).

        Module-name templates (``rewrite_module_tmp``...) are ignored: steamviz finds
        modules through its architecture adapters. Unknown keys are an error.
        """
        def layers(v):  # EasyEdit's ``layers`` are block indices
            if not isinstance(v, list) or len(v) != 1:
                raise ValueError(f"{source}: ROME edits one block; 'layers' must be [B], got {v!r}")
            return {"block": int(v[0])}

        return cls(**easyedit_kwargs(cls, d, source, "ROME",
                                     {"layers": layers, "layer": lambda v: {"block": int(v)}}))




#: EasyEdit / ROME YAML keys that steamviz does not need (modules are found by adapters)
EASYEDIT_IGNORED = {
    "alg_name", "model_name", "stats_dir", "device", "rewrite_module_tmp", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "model_parallel",
    "fp16", "mom2_dtype", "fact_token", "v_loss_layer", "mom2_dataset", "max_length",
    "batch_size", "layer_selection",
}


def easyedit_kwargs(cls, d: dict, source: str, alg: str, special: dict | None = None) -> dict:
    """Dataclass keyword arguments from an EasyEdit / ROME hparams mapping.

    Numbers are coerced to the field's type (PyYAML reads ``5e-1`` as a string), lists of
    pairs become tuples, ``mom2_n_samples`` is ``mom2_n_tokens``; keys in ``special`` map
    through their function. Unknown keys are an error naming the key.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: hparams must be a mapping, got {type(d).__name__}")
    if d.get("fact_token", "subject_last") != "subject_last":
        raise ValueError(f"{source}: only fact_token 'subject_last' is supported")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict = {}
    for k, v in d.items():
        if special and k in special:
            got = special[k](v)
            twice = [n for n in got if n in kw or n in d]
            if twice:
                raise ValueError(f"{source}: {k!r} and {twice[0]!r} name the same {alg} "
                                 f"hyperparameter; give one ({twice[0]!r})")
            kw.update(got)
            continue
        if k == "mom2_n_samples":
            k = "mom2_n_tokens"
        if k in fields:
            default = fields[k].default
            try:
                if isinstance(default, bool):
                    v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
                elif isinstance(default, int) and not isinstance(v, bool):
                    v = int(float(v))
                elif isinstance(default, float) or (default is None and isinstance(v, str)
                                                    and _is_number(v)):
                    v = float(v)
                elif isinstance(v, list):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {alg} hyperparameter {k!r} must be a number, "
                                 f"got {v!r}") from None
            kw[k] = v
        elif k not in EASYEDIT_IGNORED:
            raise ValueError(f"{source}: unknown {alg} hyperparameter {k!r}; known: "
                             f"{sorted(set(fields) | set(special or {}))}")
    return kw


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


MODEL_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": dict(block=5),
    "gpt2-xl": dict(block=17, v_num_grad_steps=20, v_weight_decay=0.5, mom2_adjustment=True),
    "EleutherAI/gpt-j-6B": dict(block=5, v_weight_decay=0.5, mom2_adjustment=True),
}
