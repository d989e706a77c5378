checkpoints_list = {}
model_path = "models/Stable-diffusion"
