# The seed's orchestrator.py; changes listed in tools/bench/README.md.
from flask import Flask, request, jsonify
import requests
import uuid
from common import get_db_connection, port, SERVICE_A_URL, SERVICE_B_URL, SERVICE_C_URL

app = Flask(__name__)

def log_saga(saga_id, service, status, message):
    conn = get_db_connection()
    cursor = conn.cursor()
    cursor.execute("INSERT INTO SAGA_LOG (saga_id, service, status, message) VALUES (%s, %s, %s, %s)",
                   (saga_id, service, status, message))
    conn.commit()
    cursor.close()
    conn.close()

@app.route('/start', methods=['POST'])
def start():
    saga_id = str(uuid.uuid4())
    data = request.json

    try:
        res_a = requests.post(SERVICE_A_URL + '/invoke', json={'username': data['username']})
        res_a.raise_for_status()
        user_id = res_a.json()['user_id']
        log_saga(saga_id, 'A', 'success', f"User {user_id} created")
    except Exception as e:
        log_saga(saga_id, 'A', 'failed', str(e))
        return jsonify({'saga': saga_id, 'status': 'failed at A'}), 500

    try:
        res_b = requests.post(SERVICE_B_URL + '/invoke', json={'user_id': user_id, 'address': data['address']})
        res_b.raise_for_status()
        log_saga(saga_id, 'B', 'success', "Address added")
    except Exception as e:
        log_saga(saga_id, 'B', 'failed', str(e))
        return jsonify({'saga': saga_id, 'status': 'failed at B'}), 500

    try:
        res_c = requests.post(SERVICE_C_URL + '/invoke', json={'user_id': user_id, 'payment_method': data['payment']})
        res_c.raise_for_status()
        log_saga(saga_id, 'C', 'success', "Payment added")
    except Exception as e:
        log_saga(saga_id, 'C', 'failed', str(e))
        return jsonify({'saga': saga_id, 'status': 'failed at C'}), 500

    return jsonify({'saga': saga_id, 'status': 'success'})

if __name__ == '__main__':
    app.run(port=port('NAIVE_ORCHESTRATOR_PORT', 5000))
