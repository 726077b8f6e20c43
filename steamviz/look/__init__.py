"""Reading the unedited model (the builders refuse an edited one).

- ``capture``  residual-stream capture at named token positions
- ``anchors``  semantic anchors, recall checks and the kNN reference bank
- ``stats``    second-moment statistics C = E[k k^T] of MLP keys
- ``pool``     the reference-fact pool: anchors for (almost) any object, and its coverage
"""
