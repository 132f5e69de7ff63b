"""LoRA layers on the Flux transformer: key names (diffusers and kohya), injection, export, continuing a file."""
