"""Pictures from records and arrays: the main map and its parts, stored runs, the head gallery, reports and study plots.

Nothing here runs the model: it never imports the extractor, the holder, the pipeline or methods/."""
