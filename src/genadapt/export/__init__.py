"""Format conversion for artifacts users take to other tools (diffusers, peft, kohya/A1111/ComfyUI)."""
