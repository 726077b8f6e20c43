"""Edit requests and reference facts, and the public data they come from.

- ``records``   reading JSON / JSON-lines records with field errors that name the record
- ``requests``  EditRequest: one counterfactual fact with its evaluation prompts
- ``datasets``  loaders: the default edit set, CounterFact, zsRE, MQuAKE
- ``facts``     reference facts (Fact) and their loaders: LRE, ParaRel, Polyglot, yours
- ``fetch``     public data sets: sources, checksums, the cache, the mirror
"""
