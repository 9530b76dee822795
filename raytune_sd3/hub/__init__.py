"""The Hugging Face Hub: the model card and upload of a trained LoRA (publish.py), and the command that does it
again by hand (`python -m raytune_sd3.hub`, __main__.py)."""
