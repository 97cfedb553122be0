"""YouTube-VIS data: annotation reader, clip sampling, transforms, video IO, synthetic generator."""
