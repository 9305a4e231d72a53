"""`matrix dedup`: exact and MinHash near-duplicate removal on Ray Data, written exactly once.

params.py       what decides the kept set (datatrove's MinHash defaults), hashed into the output's config
fingerprint.py  a document's exact key and MinHash LSH band keys (datasketch)
inputs.py       the input's units (files, byte or row-group ranges, a committed output's parts) and records
graph.py        Ray Data stages: candidate pairs per key, connected components by star contraction
output.py       the one place that writes: parts, commit records, manifest (today's OutputStore)
run.py          one run: plan, keys, clusters, each unit's kept rows written and counted
report.py       the closing report
"""
