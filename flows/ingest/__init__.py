"""Landing files to validated rows: discovery of stable files in the landing folder, reading CSV
(plain or gzip) and Parquet with errors that name the file and the place, the Great
Expectations suite built from the log schema, the ahead-of-time check of a whole file, and the
plant simulator that lands files for the demo and the tests."""
