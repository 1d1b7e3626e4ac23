# The seed's common.py; the changes (settings from NAIVE_* variables, the benchmark's
# switches below) are listed in tools/bench/README.md.
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

# Not in the seed: where the four processes listen and find each other (the seed's
# ports are the defaults), and its failure counters, off unless NAIVE_FAULTS=seed.
FAULTS = os.environ.get('NAIVE_FAULTS', 'off') == 'seed'
SERVICE_A_URL = os.environ.get('NAIVE_SERVICE_A_URL', 'http://localhost:5001')
SERVICE_B_URL = os.environ.get('NAIVE_SERVICE_B_URL', 'http://localhost:5002')
SERVICE_C_URL = os.environ.get('NAIVE_SERVICE_C_URL', 'http://localhost:5003')

def port(name, default):
    return int(os.environ.get(name, default))
