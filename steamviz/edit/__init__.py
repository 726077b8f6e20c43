"""Editors behind one registry; every edit is undoable.

- ``edits``            Edit and WeightEdit (restore bit for bit), saved deltas
- ``hparams``          the one base of every hyperparameter dataclass; the v* fields ROME and MEMIT share
- ``editors``          the registry (one Editor row per method), edit(), labels and colours
- ``rome``             ROME: rank-one model editing
- ``rome_hparams``     ROME's hyperparameters and per-model defaults
- ``rome_prepare``     ROME's shared work per request: context rows, prefix caches, keys
- ``vstar``            ROME's target vector v* (one or many objectives at once)
- ``steam``            STEAM-ROME: v* plus the latent alignment term
- ``memit``            MEMIT: many edits over a range of blocks (and STEAM-MEMIT)
- ``sake``             SAKE: steering activations with a fitted transport map
- ``sake_fit``         SAKE's fit: source and target states, the transport map
- ``sake_hparams``     SAKE's hyperparameters
- ``sake_prompts``     SAKE's fit prompts, kept apart from every evaluated prompt
- ``baft``             BaFT: basis-level representation fine-tuning
- ``kne``              KNE: knowledge neuronal ensemble editing
- ``kne_attribution``  KNE's integrated-gradient attribution and ensemble
"""
