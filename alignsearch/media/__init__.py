"""Media: reading the user's files. Where a picture's bytes come from (sources: folders, lists, URLs, tar
shards), decoding and the model's input crop (images), a video's moments (video), text in images (ocr), EXIF,
dates and GPS (photometa). Imports no model and no index: decode workers import only this wing.
"""
