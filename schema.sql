-- The saga database. Re-appliable (IF NOT EXISTS) and names no database:
--   mariadb saga_db < schema.sql
-- Made by `python -m saga.schema --print` from the engine's tables (saga/schema.sql) and
-- each saga type's own (its module's SCHEMA); edit those, not this file.
-- A database made by an earlier version (SAGA with username/address/payment columns) is
-- moved to this layout by `./run.sh upgrade` (tools/upgrade.py); see the README.
-- utf8mb4 everywhere, so any username (Zoë 名前 😀) round-trips exactly; saga ids
-- compare byte for byte (utf8mb4_bin), so 'S-1' and 's-1' are two sagas.
-- Every DATETIME is UTC: each connection of ours sets time_zone = '+00:00'.

-- Business tables, one per service, as in the seed, plus the saga that made each row.
-- saga_id is UNIQUE: one saga makes at most one row per table.
CREATE TABLE IF NOT EXISTS TABLE_A (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  username VARCHAR(255) NOT NULL,
  UNIQUE KEY table_a_saga (saga_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS TABLE_B (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  user_id INT NOT NULL,
  address VARCHAR(255),
  UNIQUE KEY table_b_saga (saga_id),
  FOREIGN KEY (user_id) REFERENCES TABLE_A(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS TABLE_C (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  user_id INT NOT NULL,
  payment_method VARCHAR(255),
  UNIQUE KEY table_c_saga (saga_id),
  FOREIGN KEY (user_id) REFERENCES TABLE_A(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The money of the transfer saga: one account per service, id = the service's letter.
-- Exact decimals; the CHECK is the database's own guard that no balance goes negative
-- (the debit is also a conditional UPDATE, so a short balance is a refusal, not an error).
CREATE TABLE IF NOT EXISTS ACCOUNT (
  id CHAR(1) NOT NULL PRIMARY KEY,
  opening DECIMAL(14,2) NOT NULL,
  balance DECIMAL(14,2) NOT NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  CONSTRAINT account_never_negative CHECK (balance >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO ACCOUNT (id, opening, balance) VALUES
  ('A', 1000.00, 1000.00), ('B', 500.00, 500.00), ('C', 250.00, 250.00);

-- The order saga (seed 003): A's orders and B's customers. An order is PENDING until it
-- is FULFILLED (its customer was charged) or REJECTED (the charge was refused); one
-- order per saga. Balances are exact and, like the accounts, never negative.
CREATE TABLE IF NOT EXISTS ORDERS (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  customer_id INT NOT NULL,
  product_id INT NOT NULL,
  quantity INT NOT NULL,
  total_price DECIMAL(14,2) NOT NULL,
  status ENUM('PENDING', 'FULFILLED', 'REJECTED') NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  UNIQUE KEY orders_saga (saga_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS CUSTOMER (
  id INT NOT NULL PRIMARY KEY,
  opening DECIMAL(14,2) NOT NULL,
  balance DECIMAL(14,2) NOT NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  CONSTRAINT customer_never_negative CHECK (balance >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO CUSTOMER (id, opening, balance) VALUES
  (1, 500.00, 500.00), (2, 100.00, 100.00), (3, 0.00, 0.00);

-- The services' idempotency and finality ledger: one key per (service, saga, operation),
-- written first by every call, so the database orders an invoke and its compensation.
-- 'invoked' and 'refused' make a repeated call answer as the first one did ('answer');
-- 'compensated' is a tombstone: a late invoke writes nothing. 'request' is what the
-- first call asked for, so a repeat asking for something else is told so.
CREATE TABLE IF NOT EXISTS STEP_LEDGER (
  service VARCHAR(40) NOT NULL,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  op VARCHAR(40) NOT NULL,
  state ENUM('invoked', 'refused', 'compensated') NOT NULL,
  request TEXT NULL,
  answer TEXT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  PRIMARY KEY (service, saga_id, op),
  KEY step_ledger_updated (updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Events a service has committed but not yet seen confirmed by the broker (choreography):
-- written in the same transaction as the business row, so no event is lost between a
-- commit and its publish; a relay publishes them and stamps published_at.
CREATE TABLE IF NOT EXISTS OUTBOX (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  service VARCHAR(40) NOT NULL,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  event VARCHAR(64) NOT NULL,
  payload TEXT NOT NULL,
  trace VARCHAR(55) NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  published_at DATETIME(3) NULL,
  KEY outbox_pending (service, published_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per saga, enough to resume it after any crash. (step, attempt) is the next
-- call to make, written before it is made; lease_owner, lease_until and fence decide
-- which orchestrator may drive it; revision counts saves, so a save whose COMMIT was
-- cut off can tell on retry whether it landed. input and results are JSON, so a new
-- saga type needs no new column; label is what a list shows for it.
CREATE TABLE IF NOT EXISTS SAGA (
  id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
  type VARCHAR(32) NOT NULL,
  mode ENUM('orchestration', 'choreography') NOT NULL DEFAULT 'orchestration',
  transport ENUM('http', 'kafka', 'rabbitmq') NOT NULL DEFAULT 'http',
  status ENUM('RUNNING', 'COMPLETED', 'COMPENSATING', 'COMPENSATED', 'FAILED') NOT NULL,
  step TINYINT UNSIGNED NOT NULL DEFAULT 0,
  attempt INT UNSIGNED NOT NULL DEFAULT 1,
  input TEXT NOT NULL,
  label VARCHAR(255) NOT NULL,
  results TEXT NOT NULL,
  failed_step VARCHAR(40) NULL,
  reason VARCHAR(1000) NULL,
  rejected TINYINT(1) NOT NULL DEFAULT 0,
  touched TINYINT(1) NOT NULL DEFAULT 0,
  next_attempt_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  compensate_until DATETIME(3) NULL,
  lease_owner VARCHAR(64) NULL,
  lease_until DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  fence INT UNSIGNED NOT NULL DEFAULT 1,
  revision INT UNSIGNED NOT NULL DEFAULT 1,
  trace VARCHAR(55) NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  KEY saga_recovery (mode, status, lease_until),
  KEY saga_created (created_at),
  KEY saga_status_created (status, created_at),
  KEY saga_type_created (type, created_at),
  KEY saga_label_created (label, created_at),
  KEY saga_finished (status, updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The seed's log, plus what tells each row apart: the step and the service's operation,
-- the action (invoke, compensate, or publish for a choreography event), the event's
-- name, the attempt, the HTTP status and the time taken. service is A, B or C for a
-- call or an event, SAGA for the saga's own transitions.
CREATE TABLE IF NOT EXISTS SAGA_LOG (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(100) COLLATE utf8mb4_bin,
  service VARCHAR(100),
  status VARCHAR(20),
  message TEXT,
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  step TINYINT UNSIGNED NULL,
  op VARCHAR(40) NULL,
  action ENUM('invoke', 'compensate', 'publish') NULL,
  event VARCHAR(64) NULL,
  attempt INT UNSIGNED NULL,
  http_status SMALLINT NULL,
  elapsed_ms INT UNSIGNED NULL,
  KEY saga_log_saga (saga_id, id),
  KEY saga_log_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Idempotent starts: a client's Idempotency-Key, the hash of what it asked for, and the
-- saga that request created. Kept at least 24 hours (longer with SAGA_RETENTION_DAYS).
CREATE TABLE IF NOT EXISTS START_KEY (
  idem_key VARBINARY(255) NOT NULL PRIMARY KEY,
  request_hash CHAR(64) NOT NULL,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  KEY start_key_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
