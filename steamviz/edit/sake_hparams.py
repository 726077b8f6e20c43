"""SAKE's hyperparameters (:class:`SAKEHparams`) and the fixed prompt pieces they default to.
Part of :mod:`steamviz.edit.sake`, which re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass

from .hparams import Hparams

# fixed context sentences (``{}`` = the prompt), added to the model-written ones
PREFIXES = (
    "Here is a fact. {}",
    "Fun fact: {}",
    "I read this in an encyclopedia: {}",
    "Are you sure? Think again. {}",
)
# prompts that state the old object first: {prompt} the rewrite prompt, {old} the old object,
# {base} one of the fact's bare prompts
OLD_OBJECT_TEMPLATES = (
    "{prompt} {old}? No, that is outdated. {base}",
    "Many people believe that {prompt} {old}. In fact, {base}",
)
# used only when the project's reference facts are not available
FALLBACK_SUBJECTS = ("London", "Barack Obama", "the Amazon River", "Mount Everest", "Toyota",
                     "Shakespeare", "Berlin", "the Moon", "Microsoft", "Picasso", "Cairo",
                     "Albert Einstein", "the Eiffel Tower", "Sydney", "Beethoven", "Nike")
FALLBACK_PROMPTS = ("The capital of Japan is", "My favourite food is", "The weather today is",
                    "Water boils at a temperature of", "The author of Hamlet is",
                    "The largest planet in the solar system is", "The chemical symbol for gold is",
                    "Once upon a time there was a", "The official language of Brazil is",
                    "The currency of the United Kingdom is the", "In 1969, the first man on the",
                    "The best way to learn a language is", "Apple was founded by",
                    "The tallest mountain in Africa is", "My name is", "The Mona Lisa was painted by")


@dataclass
class SAKEHparams(Hparams):
    """SAKE hyperparameters. Layers follow :mod:`steamviz.look.capture` numbering (layer ``l`` is
    the output of block ``l - 1``, ``1 <= l <= n_blocks``); ``None`` picks them by depth."""

    context_template_length_params: tuple = ((5, 5), (10, 5))  # model-written prefixes
    prefixes: tuple = PREFIXES
    old_object_templates: tuple = OLD_OBJECT_TEMPLATES
    # True: the request's paraphrase prompts join the fit, so the paraphrase score is
    # in-sample (how steamviz fitted SAKE before issue 18.1); keep False to report it
    use_paraphrases: bool = False
    # the relation's paraphrase templates (relations.json) filled with the subject join the
    # fit, except those evaluation reads (a paraphrase, neighborhood, portability prompt...)
    relation_paraphrases: bool = True
    target_prob: float = 0.95  # target states: P(first token of target_new) reached
    target_iters: int = 8  # line searches at most per target state
    ridge: float = 10.0  # relative ridge on both covariances (x mean variance)
    subject_layer: int | None = None  # None: ~15% of the depth
    query_layer: int | None = None  # None: ~85% of the depth
    subject_threshold: float | None = None  # None: calibrated
    query_threshold: float | None = None  # None: calibrated
    n_negative_subjects: int = 16
    n_generic: int = 40
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.context_template_length_params = tuple(
            tuple(int(v) for v in x) for x in self.context_template_length_params)
        self.prefixes = tuple(self.prefixes)
        self.old_object_templates = tuple(self.old_object_templates)
        for p in self.prefixes:
            if p.count("{}") != 1:
                raise ValueError(f"prefix {p!r} must hold exactly one '{{}}' for the prompt")
        if not 0 < self.target_prob < 1:
            raise ValueError(f"target_prob must be in (0, 1), got {self.target_prob}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.target_iters < 1:
            raise ValueError("target_iters must be >= 1")

    @classmethod
    def for_model(cls, lm) -> "SAKEHparams":
        return cls().resolved(lm)

    def resolved(self, lm) -> "SAKEHparams":
        """These hparams with ``None`` layers set for ``lm`` (and checked)."""
        n = lm.n_blocks
        s = self.subject_layer if self.subject_layer is not None else max(1, round(0.15 * n))
        q = self.query_layer if self.query_layer is not None else max(1, round(0.85 * n))
        for name, v in (("subject_layer", s), ("query_layer", q)):
            if not 1 <= v <= n:
                raise ValueError(f"{name}={v} out of range: this model has layers 1..{n}")
        return self.replace(subject_layer=int(s), query_layer=int(q))
