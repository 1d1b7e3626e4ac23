-- The seed's (000) tables, as given (the seed's CREATE DATABASE / USE left out so the
-- file applies to any database: mariadb naive_db < bench/naive/schema.sql).
CREATE TABLE TABLE_A (
  id INT AUTO_INCREMENT PRIMARY KEY,
  username VARCHAR(255) NOT NULL
);

CREATE TABLE TABLE_B (
  id INT AUTO_INCREMENT PRIMARY KEY,
  user_id INT NOT NULL,
  address VARCHAR(255),
  FOREIGN KEY (user_id) REFERENCES TABLE_A(id)
);

CREATE TABLE TABLE_C (
  id INT AUTO_INCREMENT PRIMARY KEY,
  user_id INT NOT NULL,
  payment_method VARCHAR(255),
  FOREIGN KEY (user_id) REFERENCES TABLE_A(id)
);

CREATE TABLE SAGA_LOG (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(100),
  service VARCHAR(100),
  status VARCHAR(20),
  message TEXT,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
