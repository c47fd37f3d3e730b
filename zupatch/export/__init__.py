"""Patches in other tools' formats (a PEFT LoRA adapter, for serving stacks).

This layer sits above :mod:`zupatch.patch` and below :mod:`zupatch.hub`: it
reads patches and writes plain files (safetensors + JSON); it never imports
torch or the tool whose format it writes.
"""
