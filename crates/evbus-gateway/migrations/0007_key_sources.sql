-- The CloudEvents sources a key may publish under (JSON array of exact values or `*`
-- patterns). Keys made before keys were bound to sources keep what they could do: any source.
ALTER TABLE api_keys ADD COLUMN sources TEXT NOT NULL DEFAULT '["*"]';
-- A key that may not publish has no use for sources.
UPDATE api_keys SET sources = '[]' WHERE publish = '[]';
