"""Pretrained checkpoints from the Hugging Face format: ``bigmodel import`` (hf_import), the
checkpoint's config.json → our model section (hf_config), its tensors → our names (hf_weights)."""
