"""Checkpoint formats: finding and reading a component folder's weights (safetensors; pickle
only with consent, `files`), the mechanical rename and transposition between a Flax NNX
module's parameters and a diffusers/transformers state dict (`state_dict`) with each
format's own key maps (`vae`, `text_encoder`, the LoRA formats in `lora`), orbax Flax
checkpoints (`flax_checkpoint`), and the dtypes weights are stored in (`dtypes`).

It imports nothing of `jaxfusion`: a model is built from its config there
(`jaxfusion.models.pretrained`) and filled here (`weights.load_weights`), so that a new
model family adds a module here and none of these change."""
