"""Media read into arrays: videos (decord / torchcodec, FFmpeg from a wheel, on the CPU or the GPU), images, audio, and which rank of a sequence-parallel group decodes what."""
