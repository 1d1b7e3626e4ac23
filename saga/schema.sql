-- The saga engine's tables: what every orchestrator and participant needs, whatever the
-- saga types. Re-appliable (IF NOT EXISTS), names no database. Each saga type adds its
-- own tables (its module's SCHEMA); `python -m saga.schema` applies both.

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
