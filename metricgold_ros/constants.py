"""Numbers and names that several parts of the package must agree on (no torch, no rclpy)."""

LATENT_FACTOR = 8  # the SD VAE downsamples by 8: processed sizes are multiples of it
DTYPE_CHOICES = ('auto', 'float32', 'float16', 'bfloat16')  # node parameter and --dtype
# Timed stages of one frame: the pipeline's (each also a fault-injection point), then the
# frame processor's own.
PIPELINE_STAGES = ('preprocess', 'vae_encode', 'unet', 'vae_decode', 'postprocess')
FRAME_STAGES = ('colorize', 'cloud')
