"""The results page (``radgen report``): where a run's outputs are (:mod:`.discovery`), its
figures (:mod:`.figures`) and the HTML page (:mod:`.page`)."""
