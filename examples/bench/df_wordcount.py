"""Wordcount with a dataframe engine, the same semantics as p2pmr's wordcount: a word is a
maximal run of Unicode letters, case kept. Prints the number of distinct words.
Used by `p2pmr-bench all`:  python df_wordcount.py polars|duckdb|spark-sql INPUT"""
import sys

engine, path = sys.argv[1], sys.argv[2]
LETTERS = r"\p{L}+"

if engine == "polars":
    import polars as pl

    # Lines as one string column: a separator and no quoting the text never has.
    lines = pl.scan_csv(
        path,
        has_header=False,
        separator="\x1f",
        quote_char=None,
        new_columns=["line"],
        schema_overrides={"line": pl.String},
    )
    words = (
        lines.select(pl.col("line").str.extract_all(LETTERS).alias("w"))
        .explode("w")
        .drop_nulls()
        .group_by("w")
        .len()
        .select(pl.len())
        .collect(engine="streaming")
    )
    print(words.item())
elif engine == "duckdb":
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    n = con.execute(
        f"""
        SELECT count(*) FROM (
          SELECT w, count(*) AS n FROM (
            SELECT unnest(regexp_extract_all(line, '{LETTERS}')) AS w
            FROM read_csv(?, columns = {{'line': 'VARCHAR'}}, delim = '\x1f', quote = '',
                          escape = '', header = false, auto_detect = false)
          ) GROUP BY w
        )""",
        [path],
    ).fetchone()[0]
    print(n)
elif engine == "spark-sql":
    from pyspark.sql import SparkSession, functions as F

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("wordcount")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    words = (
        spark.read.text(path)
        .select(F.explode(F.expr("regexp_extract_all(value, '(\\\\p{L}+)', 1)")).alias("w"))
        .groupBy("w")
        .count()
    )
    print(words.count())
    spark.stop()
else:
    sys.exit(f"unknown engine {engine}")
