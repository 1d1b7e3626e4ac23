# The seed's (000) common.py, unchanged except that the connection settings come from
# the environment (NAIVE_DB_*), with the seed's values as defaults, so this baseline can
# run beside the real system on its own database.
import os

import mysql.connector


def get_db_connection():
    return mysql.connector.connect(
        host=os.environ.get('NAIVE_DB_HOST', 'localhost'),
        port=int(os.environ.get('NAIVE_DB_PORT', '3306')),
        user=os.environ.get('NAIVE_DB_USER', 'root'),
        password=os.environ.get('NAIVE_DB_PASSWORD', 'password'),
        database=os.environ.get('NAIVE_DB_NAME', 'saga_db')
    )


# Benchmark switch (not in the seed): NAIVE_FAULTS=seed turns on the seed's failure
# counters (A fails every 2nd call, B exits after every 2nd commit); the default, off,
# leaves them out so the baseline's happy path can be measured.
FAULTS = os.environ.get('NAIVE_FAULTS', 'off') == 'seed'


def port(name, default):
    return int(os.environ.get(name, str(default)))
