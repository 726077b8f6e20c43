"""Measuring edits.

- ``metrics``      efficacy, paraphrase, neighborhood, portability, fluency, consistency
- ``integration``  integration metrics: cosine to anchors, controls, kNN share, old->new axis
- ``geometry``     latent maps: UMAP / PCA projections of residual streams
- ``references``   everything a run reads from the unedited model, built before any edit
- ``compare``      paired comparisons: per-edit differences, bootstrap CIs, sign-flip p
"""
