-- The saga database. Re-appliable (IF NOT EXISTS) and names no database:
--   mariadb saga_db < schema.sql
-- utf8mb4 everywhere, so any username (Zoë 名前 😀) round-trips exactly; saga ids
-- compare byte for byte (utf8mb4_bin), so 'S-1' and 's-1' are two sagas.

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

-- The services' idempotency and finality ledger: one key per (service, saga) that both
-- /invoke and /compensate write first, so the database orders them. 'invoked' makes a
-- repeated invoke answer the same; 'compensated' makes a late invoke write nothing.
CREATE TABLE IF NOT EXISTS STEP_LEDGER (
  service CHAR(1) NOT NULL,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  state ENUM('invoked', 'compensated') NOT NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  PRIMARY KEY (service, saga_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The orchestrator's state: one row per saga, enough to resume it after any crash.
-- (step, attempt) is the next call to make, written before it is made; lease_owner,
-- lease_until and fence decide which orchestrator may drive the saga.
CREATE TABLE IF NOT EXISTS SAGA (
  id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
  status ENUM('RUNNING', 'COMPLETED', 'COMPENSATING', 'COMPENSATED', 'FAILED') NOT NULL,
  step TINYINT UNSIGNED NOT NULL DEFAULT 0,
  attempt INT UNSIGNED NOT NULL DEFAULT 1,
  username VARCHAR(255) NOT NULL,
  address VARCHAR(255) NOT NULL,
  payment VARCHAR(255) NOT NULL,
  results TEXT NOT NULL,
  failed_step CHAR(1) NULL,
  reason VARCHAR(1000) NULL,
  rejected TINYINT(1) NOT NULL DEFAULT 0,
  next_attempt_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  compensate_until DATETIME(3) NULL,
  lease_owner VARCHAR(64) NULL,
  lease_until DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  fence INT UNSIGNED NOT NULL DEFAULT 1,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  KEY saga_recovery (status, lease_until),
  KEY saga_created (created_at),
  KEY saga_status_created (status, created_at),
  KEY saga_username_created (username, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The seed's log, plus what tells each call apart: step, action, attempt, HTTP status
-- and time taken. service is A, B, C for a call, SAGA for the saga's own transitions.
CREATE TABLE IF NOT EXISTS SAGA_LOG (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(100) COLLATE utf8mb4_bin,
  service VARCHAR(100),
  status VARCHAR(20),
  message TEXT,
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  step TINYINT UNSIGNED NULL,
  action ENUM('invoke', 'compensate') NULL,
  attempt INT UNSIGNED NULL,
  http_status SMALLINT NULL,
  elapsed_ms INT UNSIGNED NULL,
  KEY saga_log_saga (saga_id, id),
  KEY saga_log_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
