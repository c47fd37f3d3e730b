"""Low-level reading of the files zupatch is handed, beneath everything else.

``safetensors_file`` parses safetensors headers and reads byte ranges (patches
and checkpoints are both safetensors files); ``jsondoc`` parses JSON with the
bounds and rules every zupatch reader enforces (docs/format.md, "Limits").
Nothing here imports from the rest of zupatch except its errors.
"""
