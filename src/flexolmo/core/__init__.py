"""The ground floor: errors, file and tensor I/O, tensor names, ranks of a distributed run, progress output, provenance.
Imports nothing else of flexolmo."""
