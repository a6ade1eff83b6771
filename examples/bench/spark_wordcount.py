"""PySpark local[2] RDD wordcount, the same semantics as p2pmr's wordcount: a word is a maximal
run of Unicode letters, case kept; every distinct word with its count, saved as text.
Used by `p2pmr-bench suite`:  python spark_wordcount.py INPUT OUTPUT_DIR"""
import re
import sys

from pyspark import SparkConf, SparkContext

WORD = re.compile(r"[^\W\d_]+")

conf = (
    SparkConf()
    .setMaster("local[2]")
    .setAppName("wordcount")
    .set("spark.ui.enabled", "false")
)
sc = SparkContext(conf=conf)
sc.setLogLevel("ERROR")
counts = (
    sc.textFile(sys.argv[1])
    .flatMap(WORD.findall)
    .map(lambda w: (w, 1))
    .reduceByKey(lambda a, b: a + b)
)
counts.map(lambda kv: f"{kv[0]}\t{kv[1]}").saveAsTextFile(sys.argv[2])
sc.stop()
