"""Multi-stage pipelines built on the libraries: the demo, the pretraining study, probe scaling."""
