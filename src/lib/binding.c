/* The bindings header extension (binding.h): parse and serialize. Pure. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "util.h"

static bool all_of(const char *s, size_t len, bool (*ok)(char))
{
	for (size_t i = 0; i < len; i++)
		if (!ok(s[i]))
			return false;
	return true;
}

static bool pin_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static bool printable_char(char c)
{
	return c >= 0x20 && c < 0x7f;
}

static bool jwe_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
	       c == '-' || c == '.';
}

bool binding_valid_pin(const char *s, size_t len)
{
	return len >= 1 && len <= BINDING_PIN_MAX && all_of(s, len, pin_char);
}

bool binding_valid_config(const char *s, size_t len)
{
	return len <= BINDING_CONFIG_MAX && all_of(s, len, printable_char);
}

bool binding_valid_jwe(const char *s, size_t len)
{
	return len >= 1 && len <= BINDING_JWE_MAX && all_of(s, len, jwe_char);
}

void binding_set_free(struct binding_set *s)
{
	for (unsigned int i = 0; i < s->count; i++) {
		free(s->b[i].config);
		free(s->b[i].jwe);
	}
	memset(s, 0, sizeof(*s));
}

const struct binding *binding_find(const struct binding_set *s, unsigned int slot)
{
	for (unsigned int i = 0; i < s->count; i++)
		if (s->b[i].slot == slot)
			return &s->b[i];
	return NULL;
}

/* Insert in slot order; the fields are already checked. */
static int insert(struct binding_set *s, unsigned int slot, const char *pin, size_t pin_len, const char *config,
		  size_t config_len, const char *jwe, size_t jwe_len)
{
	struct binding b = { .slot = slot };
	unsigned int at = 0;

	if (s->count >= BINDING_MAX || binding_find(s, slot))
		return -EUCLEAN;
	memcpy(b.pin, pin, pin_len);
	b.pin[pin_len] = '\0';
	/* checked: no NUL inside */
	b.config = strndup(config, config_len);
	b.jwe = strndup(jwe, jwe_len);
	if (!b.config || !b.jwe) {
		free(b.config);
		free(b.jwe);
		return -ENOMEM;
	}
	while (at < s->count && s->b[at].slot < slot)
		at++;
	memmove(&s->b[at + 1], &s->b[at], (s->count - at) * sizeof(b));
	s->b[at] = b;
	s->count++;
	return 0;
}

int binding_parse(const uint8_t *data, size_t len, struct binding_set *out)
{
	size_t off = 8;
	uint32_t count;
	int r = -EUCLEAN;

	memset(out, 0, sizeof(*out));
	if (len < 8 || get_be32(data) != BINDING_VERSION)
		return -EUCLEAN;
	count = get_be32(data + 4);
	if (count > BINDING_MAX)
		return -EUCLEAN;
	for (uint32_t i = 0; i < count; i++) {
		unsigned int slot, pin_len, config_len;
		uint32_t jwe_len;
		const char *p;

		if (len - off < BINDING_ENTRY_HDR)
			goto fail;
		slot = data[off];
		pin_len = data[off + 1];
		config_len = get_be16(data + off + 2);
		jwe_len = get_be32(data + off + 4);
		off += BINDING_ENTRY_HDR;
		/* each bounded first: the sum cannot overflow */
		if (slot >= BINDING_MAX || pin_len > BINDING_PIN_MAX || config_len > BINDING_CONFIG_MAX ||
		    jwe_len > BINDING_JWE_MAX || len - off < (size_t)pin_len + config_len + jwe_len)
			goto fail;
		p = (const char *)data + off;
		if (!binding_valid_pin(p, pin_len) || !binding_valid_config(p + pin_len, config_len) ||
		    !binding_valid_jwe(p + pin_len + config_len, jwe_len))
			goto fail;
		r = insert(out, slot, p, pin_len, p + pin_len, config_len, p + pin_len + config_len, jwe_len);
		if (r < 0)
			goto fail;
		r = -EUCLEAN;
		off += (size_t)pin_len + config_len + jwe_len;
	}
	if (off == len)
		return 0;
fail:
	binding_set_free(out);
	return r;
}

int binding_serialize(const struct binding_set *s, uint8_t **out, size_t *len)
{
	size_t n = 8, off = 8;
	uint8_t *d;

	*out = NULL;
	*len = 0;
	if (s->count > BINDING_MAX)
		return -EINVAL;
	for (unsigned int i = 0; i < s->count; i++) {
		const struct binding *b = &s->b[i];

		if (b->slot >= BINDING_MAX || !binding_valid_pin(b->pin, strlen(b->pin)) ||
		    !binding_valid_config(b->config, strlen(b->config)) || !binding_valid_jwe(b->jwe, strlen(b->jwe)))
			return -EINVAL;
		n += BINDING_ENTRY_HDR + strlen(b->pin) + strlen(b->config) + strlen(b->jwe);
	}
	d = malloc(n);
	if (!d)
		return -ENOMEM;
	put_be32(d, BINDING_VERSION);
	put_be32(d + 4, s->count);
	for (unsigned int i = 0; i < s->count; i++) {
		const struct binding *b = &s->b[i];
		size_t pl = strlen(b->pin), cl = strlen(b->config), jl = strlen(b->jwe);

		d[off] = (uint8_t)b->slot;
		d[off + 1] = (uint8_t)pl;
		put_be16(d + off + 2, (uint16_t)cl);
		put_be32(d + off + 4, (uint32_t)jl);
		off += BINDING_ENTRY_HDR;
		memcpy(d + off, b->pin, pl);
		memcpy(d + off + pl, b->config, cl);
		memcpy(d + off + pl + cl, b->jwe, jl);
		off += pl + cl + jl;
	}
	*out = d;
	*len = n;
	return 0;
}

int binding_set_put(struct binding_set *s, unsigned int slot, const char *pin, const char *config,
		    const char *jwe)
{
	size_t pl = strlen(pin), cl = strlen(config), jl = strlen(jwe);
	int r;

	if (slot >= BINDING_MAX || !binding_valid_pin(pin, pl) || !binding_valid_config(config, cl) ||
	    !binding_valid_jwe(jwe, jl))
		return -EINVAL;
	binding_set_remove(s, slot);
	r = insert(s, slot, pin, pl, config, cl, jwe, jl);
	return r == -EUCLEAN ? -EINVAL : r;
}

int binding_set_remove(struct binding_set *s, unsigned int slot)
{
	for (unsigned int i = 0; i < s->count; i++) {
		if (s->b[i].slot != slot)
			continue;
		free(s->b[i].config);
		free(s->b[i].jwe);
		memmove(&s->b[i], &s->b[i + 1], (s->count - i - 1) * sizeof(s->b[0]));
		s->count--;
		memset(&s->b[s->count], 0, sizeof(s->b[0]));
		return 0;
	}
	return -ENOENT;
}

size_t binding_base64(const uint8_t *in, size_t n, char *out)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t o = 0;

	for (size_t i = 0; i < n; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16;

		if (i + 1 < n)
			v |= (uint32_t)in[i + 1] << 8;
		if (i + 2 < n)
			v |= in[i + 2];
		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = i + 1 < n ? tab[v >> 6 & 63] : '=';
		out[o++] = i + 2 < n ? tab[v & 63] : '=';
	}
	out[o] = '\0';
	return o;
}
